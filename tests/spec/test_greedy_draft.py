"""A greedy draft model's proposals (spec/greedy_draft.py: straight batch rows, no plan per token) are the draft
model's own greedy continuation, token for token: batched over requests with different contexts and k, across
rounds that accept everything, roll back, or feed a token the draft did not propose; and its blocks are freed."""
import pytest
import torch

from sloserve import LLM, SamplingParams
from sloserve.config import EngineConfig
from sloserve.model.loader import load_model
from sloserve.model.runner import ModelExecutor
from sloserve.spec.draft_model import DraftModelProposer
from sloserve.spec.proposer import DraftRequest

GREEDY = SamplingParams(temperature=0.0)
LENGTHS = (20, 33, 27)  # longer than a decode-row feed: each prompt is one prefill chunk, as the reference's


@pytest.fixture(scope="module")
def draft(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in LENGTHS]
    reference = LLM(str(model_dir), dtype="float32")

    def continuation(context: list[int], n: int) -> list[int]:
        """The draft's own greedy tokens after `context`, each request alone (prefill, then plain decodes)."""
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return reference.generate(prompt_token_ids=[context], sampling_params=params)[0].outputs[0].token_ids

    config = EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=64)
    executor = ModelExecutor(load_model(config), config)
    # A fresh proposer (its own cache and predictor) per test, on the one loaded draft.
    return lambda: DraftModelProposer(executor, config.block_size, config.max_num_batched_tokens), prompts, continuation


def propose(proposer, contexts: dict[str, list[int]], ks: dict[str, int]) -> dict[str, list[int]]:
    batch = [DraftRequest(rid, tokens, ks[rid], GREEDY) for rid, tokens in contexts.items()]
    return dict(zip(contexts, proposer.propose(batch)))


def test_greedy_drafts_are_the_draft_model_s_own_continuation(draft):
    new_proposer, prompts, continuation = draft
    proposer = new_proposer()
    ids = ["a", "b", "c"]
    refs = {rid: continuation(p, 40) for rid, p in zip(ids, prompts)}
    accepted = dict.fromkeys(ids, 0)  # reference tokens each request holds beyond its prompt
    context = lambda rid: prompts[ids.index(rid)] + refs[rid][: accepted[rid]]  # noqa: E731
    # First proposals one request at a time (the prompt's prefill as the reference computes it, alone).
    for rid, k in zip(ids, (4, 2, 3)):
        assert propose(proposer, {rid: context(rid)}, {rid: k}) == {rid: refs[rid][:k]}
    observed = proposer.predictor.num_observed
    # Then batched rounds: (k, tokens of the reference accepted after the round) per request. Accepting fewer than a
    # round drafted rolls the draft's cache back; k differs between requests and rounds.
    rounds = [{"a": (4, 5), "b": (2, 3), "c": (3, 1)},
              {"a": (1, 2), "b": (4, 2), "c": (4, 5)},
              {"a": (3, 0), "b": (3, 4), "c": (2, 2)},
              {"a": (4, 5), "b": (1, 1), "c": (4, 3)}]
    first_ks = {"a": 4, "b": 2, "c": 3}
    for rid in ids:  # what the first proposals' verifications accepted
        accepted[rid] += first_ks[rid] + 1
    for plan in rounds:
        drafts = propose(proposer, {rid: context(rid) for rid in ids}, {rid: k for rid, (k, _) in plan.items()})
        assert drafts == {rid: refs[rid][accepted[rid]: accepted[rid] + k] for rid, (k, _) in plan.items()}
        for rid, (_, gained) in plan.items():
            accepted[rid] += gained
    # The draft's predictor keeps pricing it: the feeding step and the rest, each proposal.
    assert proposer.predictor.num_observed == observed + 2 * len(rounds)
    proposer.forget(ids)
    assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks


def test_a_token_the_draft_did_not_propose_replaces_its_cached_drafts(draft):
    new_proposer, prompts, continuation = draft
    proposer = new_proposer()
    prompt = prompts[1]
    ours = continuation(prompt, 4)
    assert propose(proposer, {"r": prompt}, {"r": 4})["r"] == ours
    # The target rejected the first draft and chose another token: the drafts cached after the prompt are stale. What
    # follows must be what a request that never drafted them gets (its prompt cached, then the new token decoded).
    other = (ours[0] + 1) % 384
    assert propose(proposer, {"fresh": prompt}, {"fresh": 1})["fresh"] == ours[:1]
    expected = propose(proposer, {"fresh": prompt + [other]}, {"fresh": 4})["fresh"]
    assert propose(proposer, {"r": prompt + [other]}, {"r": 4})["r"] == expected
    assert expected != ours
    proposer.forget(["r", "fresh"])
    assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks


def test_greedy_and_sampled_requests_draft_in_one_batch(tiny_model_dir):
    """Greedy rows take the straight path and sampled rows the per-step one, in the same proposals: greedy outputs stay
    those of speculation off, sampled rows are verified against the distributions they were drawn from (a seeded
    request repeats itself), and both caches are emptied."""
    model_dir = tiny_model_dir("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in (5, 23, 12, 30)]
    params = [SamplingParams(max_tokens=20, temperature=0) if i % 2 == 0 else
              SamplingParams(max_tokens=20, temperature=0.8, seed=i, ignore_eos=True) for i in range(len(prompts))]
    off = LLM(str(model_dir), dtype="float32").generate(prompt_token_ids=prompts[::2], sampling_params=params[::2])
    spec = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}
    runs = []
    for _ in range(2):
        llm = LLM(str(model_dir), dtype="float32", speculative_config=spec)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        assert outs[::2] == [o.outputs[0].token_ids for o in off]
        runs.append(outs[1::2])
        assert llm.engine.speculator.stats.num_accepted_tokens > 0
        proposer = llm.engine.speculator.proposer
        assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert runs[0] == runs[1]
