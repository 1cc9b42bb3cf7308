"""A step that raises fails only the request that caused it; its neighbours get exactly the tokens they would have."""
from sloserve.engine.engine import LLMEngine
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams

from .fakes import CountingExecutor, TickingClock


class PoisonedExecutor(CountingExecutor):
    """Raises whenever a plan holds a poisoned request (as a sampler would on its bad parameters)."""

    def __init__(self, poisoned: set[str]) -> None:
        super().__init__()
        self.poisoned = poisoned
        self.calls = 0

    def execute(self, plan):
        self.calls += 1
        if any(s.request_id in self.poisoned for s in plan.scheduled):
            raise RuntimeError("invalid multinomial distribution")
        return super().execute(plan)


def _run(engine: LLMEngine) -> dict:
    finished = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def _engine(executor) -> LLMEngine:
    return LLMEngine(executor, SchedulerConfig(block_size=4), max_model_len=64, vocab_size=100, clock=TickingClock())


def test_poisoned_requests_fail_alone_and_the_rest_finish_as_if_alone():
    executor = PoisonedExecutor({"bad-1", "bad-2"})
    engine = _engine(executor)
    for i in range(6):
        engine.add_request(f"ok-{i}", [10 + i], SamplingParams(max_tokens=5))
    engine.add_request("bad-1", [3], SamplingParams(max_tokens=5))
    engine.add_request("bad-2", [4, 5, 6], SamplingParams(max_tokens=5))
    finished = _run(engine)
    assert {r: finished[r].outputs[0].finish_reason for r in ("bad-1", "bad-2")} == {"bad-1": "error", "bad-2": "error"}
    for i in range(6):
        out = finished[f"ok-{i}"].outputs[0]
        assert (out.finish_reason, out.token_ids) == ("length", [11 + i + k for k in range(5)])
    # Every block came back, and the engine still takes work.
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    engine.add_request("after", [20], SamplingParams(max_tokens=2))
    assert _run(engine)["after"].outputs[0].token_ids == [21, 22]


def test_a_fault_of_the_whole_batch_that_halving_removes_fails_nobody():
    class FailsOnceWhenFull(CountingExecutor):
        def __init__(self):
            super().__init__()
            self.failed = False

        def execute(self, plan):
            if len(plan.scheduled) == 4 and not self.failed:
                self.failed = True
                raise MemoryError("step too large")
            return super().execute(plan)

    engine = _engine(FailsOnceWhenFull())
    for i in range(4):
        engine.add_request(f"r{i}", [10 + i], SamplingParams(max_tokens=3))
    finished = _run(engine)
    assert sorted(out.outputs[0].finish_reason for out in finished.values()) == ["length"] * 4
    assert finished["r2"].outputs[0].token_ids == [13, 14, 15]
