"""Parallel sampling (n > 1) in the engine: siblings prefill the prompt once, report under the parent's id,
are seeded seed + i, abort together and free every block."""
import pytest

from sloserve.engine.engine import LLMEngine
from sloserve.engine.request_group import child_params
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams

from .fakes import CountingExecutor, TickingClock, run_to_completion


def make_engine(caching: bool = True, max_num_batched_tokens: int = 512) -> LLMEngine:
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, block_size=4, enable_prefix_caching=caching)
    return LLMEngine(CountingExecutor(), config, max_model_len=64, vocab_size=100, clock=TickingClock())


def prompt_tokens_computed(engine: LLMEngine) -> int:
    """Prompt positions the executor was asked to compute, over every step so far."""
    return sum(min(s.num_computed_tokens + s.num_new_tokens, 18) - s.num_computed_tokens
               for plan in engine.executor.plans for s in plan.scheduled if s.num_computed_tokens < 18)


def test_n_siblings_report_under_the_parent_with_indexes_and_compute_the_prompt_once():
    engine = make_engine()
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks of 4 and a 2-token tail
    engine.add_request("r", prompt, SamplingParams(max_tokens=3, n=3))
    seen_ids = set()
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen_ids.add(out.request_id)
            if out.finished:
                finished[out.request_id] = out
    assert seen_ids == {"r"}  # siblings never show up under their own ids
    out = finished["r"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [[19, 20, 21]] * 3
    assert all(c.finish_reason == "length" for c in out.outputs)
    # The leader computes all 18 prompt tokens; each sibling only the 2 tokens past the 16 cached ones.
    assert prompt_tokens_computed(engine) == 18 + 2 * 2
    assert engine.block_manager.stats.hits == 2 * 16
    blocks = engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and all(b.ref_count == 0 for b in blocks.blocks)


def test_with_caching_off_siblings_are_not_held_back_and_each_computes_the_prompt():
    engine = make_engine(caching=False)
    engine.add_request("r", list(range(1, 19)), SamplingParams(max_tokens=2, n=3))
    out = run_to_completion(engine)["r"]
    assert [c.token_ids for c in out.outputs] == [[19, 20]] * 3
    assert len(engine.executor.plans[0].scheduled) == 3  # all three admitted in the first step
    assert prompt_tokens_computed(engine) == 3 * 18


def test_siblings_wait_for_a_chunked_prompt_and_a_leader_that_finishes_at_once():
    # Budget 8: the leader's 18-token prompt takes three steps; max_tokens=1 ends it in its last one.
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("r", list(range(1, 19)), SamplingParams(max_tokens=1, n=2))
    out = run_to_completion(engine)["r"]
    assert [c.token_ids for c in out.outputs] == [[19], [19]]
    assert [[s.request_id for s in p.scheduled] for p in engine.executor.plans[:4]] == [["0_r"]] * 3 + [["1_r"]]
    assert engine.block_manager.stats.hits == 16  # the finished leader's blocks stayed cached


def test_sibling_seeds_are_seed_plus_index_and_unseeded_stay_unseeded():
    params = SamplingParams(temperature=1.0, seed=41, n=3)
    assert [child_params(params, i).seed for i in range(3)] == [41, 42, 43]
    assert all(child_params(params, i).n == 1 for i in range(3))
    assert child_params(SamplingParams(seed=2**63 - 1, n=2), 1).seed == -(2**63)  # wraps inside int64
    assert child_params(SamplingParams(n=2), 1).seed is None


def test_abort_of_the_parent_id_aborts_every_sibling_held_or_running_and_frees_their_blocks():
    engine = make_engine()
    engine.add_request("r", list(range(1, 19)), SamplingParams(max_tokens=20, n=3))
    engine.step()  # the leader prefills
    engine.step()  # the siblings are admitted
    assert len(engine.requests) == 3
    assert engine.abort_request("r")
    assert not engine.has_unfinished_requests() and engine.requests == {}
    blocks = engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and all(b.ref_count == 0 for b in blocks.blocks)
    assert not engine.abort_request("r")  # already ended


def test_abort_before_the_siblings_are_released():
    engine = make_engine()
    group = engine.add_request("r", list(range(1, 19)), SamplingParams(max_tokens=20, n=3))
    assert engine.abort_request("r")
    assert not engine.has_unfinished_requests()
    out = group.output()
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert engine.step() == []


def test_sibling_ids_are_checked_for_clashes_and_n_is_validated():
    engine = make_engine()
    engine.add_request("1_r", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", [1, 2], SamplingParams(max_tokens=1, n=2))
    engine.add_request("g", [1, 2], SamplingParams(max_tokens=1, n=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("g", [1, 2], SamplingParams(max_tokens=1))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="^n must be"):
            SamplingParams(n=bad)
