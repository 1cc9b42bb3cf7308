"""Logprobs and prompt logprobs equal Hugging Face transformers' log-softmax on the same weights (fp32, 1e-4)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from sloserve import LLM, SamplingParams

ATOL = 1e-4
K = 5
PROMPT_LENS = (3, 17, 40, 9)
SCENARIOS = {
    "batched": dict(),
    # A budget smaller than most prompts: prompt logprobs must span chunk boundaries.
    "chunked_prefill": dict(max_num_batched_tokens=8),
    # 22 blocks of 4 tokens hold the prompts but not their outputs: requests get preempted and recomputed.
    "preemption": dict(block_size=4, num_kv_blocks=22),
}


def make_prompts(seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 384, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)


def check_position(entry: dict, token: int, row: torch.Tensor, k: int) -> None:
    """One position's dict: the token's logprob and rank, then the top-k sorted, all equal to HF's row."""
    assert abs(entry[token].logprob - float(row[token])) < ATOL
    assert entry[token].rank == int((row >= row[token]).sum())
    top = sorted((v for t, v in entry.items() if v.rank <= k), key=lambda v: v.rank)
    assert [v.rank for v in top] == list(range(1, k + 1))
    assert [v.logprob for v in top] == sorted((v.logprob for v in top), reverse=True)
    expected = torch.topk(row, k)
    assert torch.allclose(torch.tensor([v.logprob for v in top]), expected.values, atol=ATOL)
    assert set(entry) == {token} | set(expected.indices.tolist())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_logprobs_and_prompt_logprobs_match_transformers(scenario, model_dir, hf):
    prompts = make_prompts()
    llm = LLM(str(model_dir), dtype="float32", **SCENARIOS[scenario])
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=K, prompt_logprobs=K)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    if scenario == "preemption":
        assert sum(o.num_preemptions for o in outs) > 0
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        tokens = prompt + completion.token_ids
        rows = hf_logprobs(hf, tokens)
        assert len(completion.logprobs) == len(completion.token_ids)
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = rows[len(prompt) - 1 + i]
            assert token == int(row.argmax())  # greedy: the sampled token is HF's most likely
            check_position(entry, token, row, K)
        assert abs(completion.cumulative_logprob - sum(float(rows[len(prompt) - 1 + i, t])
                                                       for i, t in enumerate(completion.token_ids))) < 1e-3
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            check_position(out.prompt_logprobs[j], prompt[j], rows[j - 1], K)
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks


def test_sampled_logprobs_are_the_raw_model_distribution(model_dir, hf):
    """vLLM's default (raw_logprobs): temperature, top-k and penalties shape sampling, not the logprobs."""
    prompt = make_prompts()[1]
    llm = LLM(str(model_dir), dtype="float32")
    params = SamplingParams(max_tokens=8, temperature=0.7, top_k=20, repetition_penalty=1.3, seed=3, logprobs=0)
    completion = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0]
    rows = hf_logprobs(hf, prompt + completion.token_ids)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert set(entry) == {token}  # logprobs=0: the sampled token alone
        assert abs(entry[token].logprob - float(rows[len(prompt) - 1 + i, token])) < ATOL


def test_requests_without_logprobs_are_unchanged_by_a_neighbour_that_asks(model_dir):
    prompts = make_prompts(11)
    plain = SamplingParams(max_tokens=10, temperature=0.8, seed=5)
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16)
    alone = llm.generate(prompt_token_ids=prompts[1:], sampling_params=plain)
    asking = SamplingParams(max_tokens=10, temperature=0, logprobs=3, prompt_logprobs=2)
    mixed = llm.generate(prompt_token_ids=prompts, sampling_params=[asking] + [plain] * (len(prompts) - 1))
    assert [o.outputs[0].token_ids for o in mixed[1:]] == [o.outputs[0].token_ids for o in alone]
    assert all(o.outputs[0].logprobs is None and o.prompt_logprobs is None for o in mixed[1:])
    assert len(mixed[0].outputs[0].logprobs) == 10 and len(mixed[0].prompt_logprobs) == len(prompts[0])


def test_prompt_logprobs_are_complete_when_the_prompt_is_cached(model_dir, hf):
    """A cached prefix is never computed, so a request asking prompt logprobs skips the cache (as vLLM's)."""
    prompt = make_prompts()[2]
    llm = LLM(str(model_dir), dtype="float32", block_size=4)
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, temperature=0))
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, temperature=0,
                                                                                  prompt_logprobs=1))[0]
    rows = hf_logprobs(hf, prompt)
    assert len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        check_position(out.prompt_logprobs[j], prompt[j], rows[j - 1], 1)


def test_logprobs_under_speculation_come_from_the_verify_logits(model_dir, hf):
    prompts = make_prompts()
    # The model as its own draft: every draft is accepted, so most tokens come from verifications.
    llm = LLM(str(model_dir), dtype="float32",
              speculative_config={"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3})
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=16, temperature=0, logprobs=2))
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        rows = hf_logprobs(hf, prompt + completion.token_ids)
        assert len(completion.logprobs) == len(completion.token_ids)
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            check_position(entry, token, rows[len(prompt) - 1 + i], 2)


@pytest.mark.parametrize("field,value,needle", [("logprobs", 21, "max allowed: 20"), ("prompt_logprobs", 25, "max allowed"),
                                                 ("logprobs", -1, "non-negative")])
def test_logprobs_out_of_range_are_refused(model_dir, field, value, needle):
    llm = LLM(str(model_dir), dtype="float32")
    with pytest.raises(ValueError, match=needle):
        llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_tokens=2, **{field: value}))
    assert not llm.engine.has_unfinished_requests()


def test_long_prompts_are_scored_in_slices_with_the_same_values(model_dir, hf, monkeypatch):
    from sloserve.model import logprobs

    monkeypatch.setattr(logprobs, "ROWS_AT_ONCE", 4)
    prompt = make_prompts()[2]
    llm = LLM(str(model_dir), dtype="float32")
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    rows = hf_logprobs(hf, prompt)
    for j in range(1, len(prompt)):
        check_position(out.prompt_logprobs[j], prompt[j], rows[j - 1], 3)
