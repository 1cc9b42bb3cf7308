"""The profiler's grid stays inside what the engine can schedule, and its plans look like the Scheduler's."""
from sloserve.engine.kv_cache import BlockManager
from sloserve.sim.clock import VirtualClock
from sloserve.engine.features import ExecuteFeatures, StepShape
from sloserve.sim.shapes import Chunk, GridLimits, PlanBuilder, shape_of, step_grid


def test_grid_respects_the_engine_limits_and_covers_every_kind_of_step():
    limits = GridLimits(max_num_batched_tokens=256, max_num_seqs=32, max_model_len=1024, num_kv_blocks=600, block_size=16)
    grid = step_grid(limits)
    assert all(limits.allows(step) for step in grid)
    kinds = {("decode" if all(c.new_tokens == 1 for c in s) else "prefill" if len(s) == 1 else "mixed",
              any(c.context and c.new_tokens > 1 for c in s)) for s in grid}
    assert {("decode", False), ("prefill", False), ("prefill", True), ("mixed", False), ("mixed", True)} <= kinds
    assert any(not c.samples for s in grid for c in s)  # chunks that stop short of the prompt's end
    assert max(len(s) for s in grid) == 32 and max(sum(c.new_tokens for c in s) for s in grid) == 256


def test_plans_are_built_from_real_requests_and_blocks():
    manager = BlockManager(64, 16)
    builder = PlanBuilder(manager, vocab_size=100)
    step = [Chunk(1, 40), Chunk(20, 0), Chunk(30, 17, samples=False)]
    plan = builder.build(step)
    assert [s.samples for s in plan.scheduled] == [True, True, False]
    assert [len(s.block_table) for s in plan.scheduled] == [3, 2, 3]
    assert StepShape.of(plan) == shape_of(step)
    execute = ExecuteFeatures((1, 32, 64))
    features = dict(zip(execute.terms, execute(StepShape.of(plan))))
    # 50 prompt tokens: between the knots 32 and 64; the decode apart, in its own table.
    assert [features[f"prefill_tokens@{k}"] for k in (32, 64)] == [14 / 32, 18 / 32]
    assert [features[f"decode_tokens@{k}"] for k in (1, 32, 64)] == [1, 0, 0]
    assert (features["samples"], features["requests"]) == (2, 3)
    builder.release(plan)
    assert manager.num_free_blocks == 64


def test_virtual_clock_moves_only_forward():
    clock = VirtualClock()
    clock.advance(0.5)
    clock.advance_to(0.2)  # a late arrival is simply now
    assert clock.now() == 0.5
    clock.advance_to(2.0)
    assert clock.now() == 2.0
