"""A step that raises fails only the request that caused it; its neighbours get exactly the tokens they would have."""
from sloserve.engine.engine import LLMEngine
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams

from .fakes import CountingExecutor, LetterTokenizer, TickingClock


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


class PoisonedTokenizer(LetterTokenizer):
    """Cannot decode token 77 (as a tokenizer may fail on an id it has no text for)."""

    def decode(self, ids, skip_special_tokens=True):
        if 77 in ids:
            raise KeyError(77)
        return super().decode(ids, skip_special_tokens)


def test_a_request_whose_output_processing_raises_fails_alone():
    engine = LLMEngine(CountingExecutor(), SchedulerConfig(block_size=4), max_model_len=64, vocab_size=100,
                       clock=TickingClock(), tokenizer=PoisonedTokenizer())
    for i in range(4):
        engine.add_request(f"ok-{i}", [10 + i], SamplingParams(max_tokens=5))
    engine.add_request("bad", [75], SamplingParams(max_tokens=5))  # samples 76, then 77: its detokenizer raises
    finished = _run(engine)
    assert (finished["bad"].outputs[0].finish_reason, finished["bad"].outputs[0].token_ids[:1]) == ("error", [76])
    for i in range(4):
        out = finished[f"ok-{i}"].outputs[0]
        assert (out.finish_reason, out.token_ids) == ("length", [11 + i + k for k in range(5)])
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


class VerifyingExecutor(CountingExecutor):
    """CountingExecutor's tokens (last + 1) with draft verification: accepts the drafts that match, then one more."""

    def execute(self, plan):
        self.plans.append(plan)
        sampled = []
        for s in plan.scheduled:
            drafts = s.spec_token_ids
            expect = s.token_ids[len(s.token_ids) - len(drafts) - 1] + 1
            tokens = []
            for d in drafts:
                if d != expect:
                    break
                tokens.append(d)
                expect += 1
            sampled.append(tokens + [expect] if s.samples else [])
        return sampled


class FailingSpeculator:
    """Drafts the right next token (last + 1) and raises on its `fail_on`-th proposal, as a draft model's forward
    might."""

    def __init__(self, fail_on: int) -> None:
        self.fail_on = fail_on
        self.proposals = 0
        self.forgotten: list[str] = []

    def propose(self, running, predictor):
        self.proposals += 1
        if self.proposals == self.fail_on:
            raise RuntimeError("draft forward failed")
        return {r.request_id: [r.output_token_ids[-1] + 1] for r in running if r.output_token_ids}

    def observe(self, plan, sampled):
        pass

    def forget(self, request_ids):
        self.forgotten.extend(request_ids)


def test_a_failing_speculator_costs_its_step_the_drafts_and_nothing_else():
    speculator = FailingSpeculator(fail_on=3)
    engine = LLMEngine(VerifyingExecutor(), SchedulerConfig(block_size=4), max_model_len=64, vocab_size=100,
                       clock=TickingClock(), speculator=speculator)
    for i in range(3):
        engine.add_request(f"r{i}", [10 + i], SamplingParams(max_tokens=6))
    finished = _run(engine)
    for i in range(3):
        out = finished[f"r{i}"].outputs[0]
        assert (out.finish_reason, out.token_ids) == ("length", [11 + i + k for k in range(6)])
    # The proposer's state for every running request was reset (it may have been left half-updated).
    assert {"r0", "r1", "r2"} <= set(speculator.forgotten)
    assert engine.block_manager.num_used_blocks == 0
    # Drafts were verified before and after the failed proposal (two tokens a step), so the run was speculative.
    assert sum(len(s.spec_token_ids) for plan in engine.executor.plans for s in plan.scheduled) >= 6


def test_a_predictor_that_fails_to_learn_fails_no_request():
    class BrokenPredictor:
        def step_seconds(self, shape):
            return 0.01

        def observe(self, shape, seconds):
            raise FloatingPointError("refit diverged")

    engine = LLMEngine(CountingExecutor(), SchedulerConfig(block_size=4, policy="slo"), max_model_len=64,
                       vocab_size=100, clock=TickingClock(), predictor=BrokenPredictor())
    for i in range(3):
        engine.add_request(f"r{i}", [10 + i], SamplingParams(max_tokens=4))
    finished = _run(engine)
    assert [finished[f"r{i}"].outputs[0].finish_reason for i in range(3)] == ["length"] * 3


def test_a_request_the_policy_cannot_rank_fails_alone():
    from sloserve.engine.policy import FCFS

    class BrokenOnOne(FCFS):
        def rank(self, request):
            if request.request_id == "bad":
                raise ArithmeticError("cannot rank")
            return super().rank(request)

    engine = LLMEngine(CountingExecutor(), SchedulerConfig(block_size=4), max_model_len=64, vocab_size=100,
                       clock=TickingClock(), policy=BrokenOnOne())
    for i in range(3):
        engine.add_request(f"ok-{i}", [10 + i], SamplingParams(max_tokens=4))
    engine.add_request("bad", [30], SamplingParams(max_tokens=4))
    finished = _run(engine)
    assert finished["bad"].outputs[0].finish_reason == "error"
    assert [finished[f"ok-{i}"].outputs[0].token_ids for i in range(3)] == [[11 + i + k for k in range(4)] for i in range(3)]
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
