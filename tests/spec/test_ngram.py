"""The n-gram (prompt lookup) proposer on hand-made token lists, and greedy exactness on the copy-own workload's shape."""
import random

import pytest

from benchmarks.spec_workloads import SEPARATOR, copy_own_prompts, openings
from sloserve import LLM, SamplingParams
from sloserve.cli_args import default_model_dir
from sloserve.request import SamplingParams as Params
from sloserve.spec.ngram import NgramProposer
from sloserve.spec.proposer import DraftRequest


def scan(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, by brute force: for n from max down to min, the latest earlier occurrence of the last n tokens."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        for start in range(size - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[size - n:]:
                return tokens[start + n : start + n + k]
    return []


def test_the_longest_matching_ngram_wins_over_a_later_shorter_one():
    tokens = [1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3]  # [1, 2, 3] at 0 (then 9); only [2, 3] at 5 (then 7), later
    assert NgramProposer(2, 4).lookup(tokens, 4) == [9, 5, 2, 3]
    assert NgramProposer(2, 2).lookup(tokens, 4) == [7, 1, 2, 3]  # max 2: the latest [2, 3]


def test_the_latest_occurrence_of_an_ngram_wins():
    assert NgramProposer(2, 2).lookup([1, 2, 5, 1, 2, 6, 1, 2], 2) == [6, 1]


def test_max_n_caps_the_match_and_min_n_refuses_short_ones():
    tokens = [1, 2, 3, 4, 5, 8, 9, 3, 4, 5, 7, 1, 2, 3, 4, 5]
    assert NgramProposer(2, 5).lookup(tokens, 2) == [8, 9]  # the whole 5-gram at 0
    assert NgramProposer(2, 3).lookup(tokens, 2) == [7, 1]  # [3, 4, 5], latest at 7
    only_unigram = [4, 8, 6, 9, 4]
    assert NgramProposer(2, 4).lookup(only_unigram, 3) == []
    assert NgramProposer(1, 4).lookup(only_unigram, 3) == [8, 6, 9]


def test_no_match_or_too_short_a_context_gives_no_draft():
    assert NgramProposer(2, 4).lookup([1, 2, 3, 4, 5, 6], 4) == []
    assert NgramProposer(2, 4).lookup([7, 7], 4) == []  # a 2-gram needs a token before it to have followed
    assert NgramProposer(1, 4).lookup([7, 7], 4) == [7]
    assert NgramProposer(2, 4).lookup([], 4) == []
    assert NgramProposer(2, 4).lookup([3, 1, 2, 3, 1, 2], 0) == []


def test_a_continuation_running_into_the_suffix_is_cut_at_the_context_end():
    assert NgramProposer(2, 4).lookup([1, 2, 7, 1, 2], 5) == [7, 1, 2]


@pytest.mark.parametrize("vocab", [3, 50])
def test_a_request_s_index_kept_between_steps_gives_the_brute_force_drafts_as_its_tokens_grow(vocab):
    rng = random.Random(vocab)
    proposer = NgramProposer(2, 4)
    params = Params(max_tokens=8)
    tokens = {"a": [], "b": []}
    for _ in range(150):
        for request_id, seq in tokens.items():
            seq.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 6)))  # a step's accepted tokens
        batch = [DraftRequest(i, list(seq), 3, params) for i, seq in tokens.items()]
        assert proposer.propose(batch) == [scan(seq, 3, 2, 4) for seq in tokens.values()]
    proposer.forget(["a"])
    assert set(proposer._indexes) == {"b"}
    tokens["b"] = tokens["b"][:10]  # not the tokens its index was built from (a preempted request restarts)
    assert proposer.propose([DraftRequest("b", tokens["b"], 3, params)]) == [scan(tokens["b"], 3, 2, 4)]


@pytest.mark.parametrize("vocab", [3, 50])
def test_lookup_equals_the_brute_force_definition(vocab):
    rng = random.Random(vocab)
    for _ in range(400):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 60))]
        if tokens and rng.random() < 0.5:
            tokens += tokens[: rng.randrange(1, len(tokens) + 1)]
        lo = rng.randrange(1, 4)
        hi = rng.randrange(lo, 6)
        k = rng.randrange(0, 6)
        assert NgramProposer(lo, hi).lookup(tokens, k) == scan(tokens, k, lo, hi), (tokens, k, lo, hi)


def test_propose_drafts_each_request_up_to_its_k():
    proposer = NgramProposer(2, 3)
    batch = [DraftRequest("a", [1, 2, 3, 4, 1, 2], 1, Params()), DraftRequest("b", [5, 6, 7, 8], 3, Params()),
             DraftRequest("c", [9, 9, 9, 9, 9], 3, Params())]
    assert proposer.propose(batch) == [[3], [], [9]]
    assert proposer.seconds_per_token > 0


def test_greedy_identical_on_the_copy_own_workload():
    """The benchmark's copy-own prompts (start + the demo model's own passage + separator + start, built by the
    benchmark's code) on the bundled target: drafts are accepted, and not one greedy token changes."""
    target = str(default_model_dir())
    off = LLM(target, dtype="float32")

    def generate(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [o.outputs[0].token_ids for o in off.generate(prompt_token_ids=prompts, sampling_params=params)]

    tok = off.tokenizer
    starts = [tok.encode(o) for o in openings()[:3]]
    separator = tok.encode(SEPARATOR)
    prompts = copy_own_prompts(generate, starts, separator, 32)
    assert all(p[: len(s)] == s and p[-len(s):] == s and len(p) == 2 * len(s) + 32 + len(separator)
               for p, s in zip(prompts, starts))
    expected = generate(prompts, 24)
    for k_policy in ("fixed", "adaptive"):
        llm = LLM(target, dtype="float32", speculative_config={
            "method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4, "num_speculative_tokens": 4,
            "k_policy": k_policy})
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=24, temperature=0,
                                                                                      ignore_eos=True))
        assert [o.outputs[0].token_ids for o in outs] == expected, k_policy
        st = llm.engine.speculator.stats
        assert st.num_emitted_tokens == st.num_accepted_tokens + st.num_drafts
        if k_policy == "fixed":
            assert st.num_accepted_tokens > 0  # the repeated start is found and the passage copied back
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
