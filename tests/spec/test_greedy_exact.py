"""Speculation is lossless: greedy outputs token-identical to speculation off, for tiny random models of
each family and the bundled demo pair, batched, with chunked prefill and with preemption."""
import pytest
import torch

from sloserve import LLM, SamplingParams
from sloserve.cli_args import default_model_dir
from tests.conftest import save_tiny_model

MAX_TOKENS = 24
SCENARIOS = {
    "batched": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(block_size=4, num_kv_blocks=40),
}


def prompts(seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (3, 17, 40, 9, 31):
        p = torch.randint(2, 384, (n,), generator=g).tolist()
        out.append(p + p[: n // 2])  # repeated text, so n-gram lookup finds something to propose
    return out


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """A random draft of another seed: mostly rejected drafts."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("draft"), seed=1)


def generate(model_dir, spec, **knobs):
    llm = LLM(str(model_dir), dtype="float32", speculative_config=spec, **knobs)
    outs = llm.generate(prompt_token_ids=prompts(), sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks
    return llm, outs


def check_counts(llm):
    st = llm.engine.speculator.stats
    assert 0 <= st.num_accepted_tokens <= st.num_draft_tokens
    assert st.num_emitted_tokens == st.num_accepted_tokens + st.num_drafts
    assert sum(st.accepted_per_pos) == st.num_accepted_tokens
    proposer = llm.engine.speculator.proposer
    if hasattr(proposer, "blocks"):  # the draft model's own paged cache is emptied too
        assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks
    return st


@pytest.mark.parametrize("kind", ["llama", "smollm", "mistral", "qwen2", "qwen3"])
def test_greedy_identical_with_speculation(kind, tiny_model_dir, other_draft):
    model_dir = tiny_model_dir(kind)
    methods = {
        "ngram": {"method": "ngram", "num_speculative_tokens": 3},
        # The target as its own draft: nearly every draft accepted, long accepted runs.
        "self_draft": {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 4},
    }
    if kind == "llama":
        methods["other_draft"] = {"method": "draft_model", "model": str(other_draft), "num_speculative_tokens": 2}
    scenarios = SCENARIOS if kind in ("llama", "qwen3") else {"batched": SCENARIOS["batched"]}
    for scenario, knobs in scenarios.items():
        _, expected = generate(model_dir, None, **knobs)
        expected = [o.outputs[0].token_ids for o in expected]
        for name, spec in methods.items():
            llm, outs = generate(model_dir, spec, **knobs)
            assert [o.outputs[0].token_ids for o in outs] == expected, f"{kind}: {name} differs under {scenario}"
            st = check_counts(llm)
            # (n-gram lookup drafts only where a random model's output repeats; the bundled test checks it drafts)
            assert st.num_drafts > 0 or name == "ngram", f"{kind}: {name} never verified a draft under {scenario}"
            if name == "self_draft":
                assert st.acceptance_rate > 0.9
            if scenario == "preemption":
                assert sum(o.num_preemptions for o in outs) > 0


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_identical_in_bfloat16_with_near_ties(kind, tmp_path):
    """bfloat16 logits of a model with small weights are full of near ties, so a verification row rounded
    in any way other than its plain decode flips greedy tokens (it did, for most methods, before verification
    rows took decode arithmetic). Every prompt is prefilled in the first step, as with speculation off."""
    model_dir = save_tiny_model(kind, tmp_path, initializer_range=0.05)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)

    def run(spec):
        llm = LLM(str(model_dir), dtype="bfloat16", speculative_config=spec)
        return llm, [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts(), sampling_params=params)]

    _, expected = run(None)
    for spec in ({"method": "ngram", "num_speculative_tokens": 3},
                 {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 4}):
        llm, outs = run(spec)
        assert outs == expected, f"{kind}: {spec['method']} differs"
        assert check_counts(llm).num_drafts > 0 or spec["method"] == "ngram"


def test_bundled_pair_greedy_identical():
    target = default_model_dir()
    draft = target.parent / "demo-draft"
    chats = ["Hello! How are you today?", "Tell me about the weather.", "What is a good name for a cat?"]
    params = SamplingParams(max_tokens=32, temperature=0)
    expected = [o.outputs[0].token_ids for o in LLM(str(target)).generate(chats, params)]
    for spec in ({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4},
                 {"method": "ngram", "num_speculative_tokens": 4, "k_policy": "adaptive"},
                 {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4, "k_policy": "adaptive"}):
        llm = LLM(str(target), speculative_config=spec)
        assert [o.outputs[0].token_ids for o in llm.generate(chats, params)] == expected, spec
        st = check_counts(llm)
        if spec.get("k_policy") != "adaptive":  # (adaptive may rightly choose not to speculate)
            assert st.num_accepted_tokens > 0, spec


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(str(default_model_dir()), speculative_config={
            "method": "draft_model", "model": str(tiny_model_dir("llama")), "num_speculative_tokens": 2})


@pytest.mark.parametrize("spec, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_maxx": 3}, "prompt_lookup_maxx"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ('{"method": "ngram",', "not valid JSON"),
])
def test_bad_speculative_configs_are_refused(spec, message, tiny_model_dir):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_model_dir("llama")), speculative_config=spec)


def test_sampled_requests_with_a_draft_model_run_through_rejection_sampling(tiny_model_dir):
    """End to end: sampled drafts, their distributions handed to the verifier; a seeded request repeats itself."""
    model_dir = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True) for s in range(len(prompts()))]
    runs = []
    for _ in range(2):
        llm = LLM(str(model_dir), dtype="float32", speculative_config=spec)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts(), sampling_params=params)])
        st = check_counts(llm)
        assert st.num_drafts > 0 and st.num_accepted_tokens > 0
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert runs[0] == runs[1] and all(len(t) == MAX_TOKENS for t in runs[0])
