"""The engine carries an executor's logprobs into requests: aligned with the kept tokens, each prompt position once."""
import pytest

from sloserve.engine.engine import LLMEngine
from sloserve.engine.executor import PositionLogprobs, StepLogprobs
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams

from .fakes import CountingExecutor, LetterTokenizer, TickingClock, run_to_completion


def scored(token: int) -> PositionLogprobs:
    """A made-up position whose logprob names its token, so a test can see which position landed where."""
    return PositionLogprobs([token, 99], [-float(token), -0.5], rank=2)


class LogprobsExecutor(CountingExecutor):
    """Samples like CountingExecutor, `burst` tokens at a time. Its prompt logprobs score every token
    seen so far from token 1 on, each step again, as a recompute after preemption does (and past the
    prompt, as a recompute of output tokens does); `gap_for` names a request whose scores skip a token."""

    def __init__(self, burst: int = 1, gap_for: str | None = None) -> None:
        super().__init__()
        self.burst = burst
        self.gap_for = gap_for
        self.seen: dict[str, list[int]] = {}
        self._taken: dict[str, StepLogprobs] = {}

    def execute(self, plan):
        self.plans.append(plan)
        out = []
        for s in plan.scheduled:
            seen = self.seen[s.request_id] = self.seen.get(s.request_id, [])[: s.num_computed_tokens] + s.token_ids
            step = StepLogprobs()
            if s.sampling_params.prompt_logprobs is not None:
                gap = int(s.request_id == self.gap_for)
                step.prompt_start = 1 + gap
                step.prompt = [scored(t) for t in seen[1 + gap :]]
            tokens = [s.token_ids[-1] + 1 + i for i in range(self.burst)] if s.samples else []
            step.sampled = [scored(t) for t in tokens]
            self._taken[s.request_id] = step
            out.append(tokens)
        return out

    def take_logprobs(self):
        taken, self._taken = self._taken, {}
        return taken


def make_engine(executor, budget: int = 512) -> LLMEngine:
    return LLMEngine(executor, SchedulerConfig(max_num_batched_tokens=budget, block_size=4), max_model_len=64,
                     vocab_size=100, clock=TickingClock(), tokenizer=LetterTokenizer())


def test_an_executor_without_logprobs_refuses_requests_that_ask():
    engine = make_engine(CountingExecutor())
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=field):
            engine.add_request(field, [1, 2], SamplingParams(max_tokens=2, **{field: 1}))


def test_logprobs_past_a_stop_token_are_dropped_with_the_tokens():
    engine = make_engine(LogprobsExecutor(burst=3))
    engine.add_request("r", [10], SamplingParams(max_tokens=10, stop_token_ids=[12], logprobs=1))
    completion = run_to_completion(engine)["r"].outputs[0]
    assert completion.token_ids == [11, 12]
    assert [list(d) for d in completion.logprobs] == [[11, 99], [12, 99]]
    assert completion.logprobs[0][11].rank == 2 and completion.logprobs[0][99].rank == 1
    assert completion.logprobs[0][11].decoded_token == "l"  # the engine's tokenizer names each token
    assert completion.cumulative_logprob == -23.0


def test_prompt_logprobs_arrive_once_per_prompt_token_however_often_scored():
    engine = make_engine(LogprobsExecutor(), budget=3)
    prompt = [10, 11, 12, 13, 14, 15, 16]
    engine.add_request("r", prompt, SamplingParams(max_tokens=4, prompt_logprobs=0))
    out = run_to_completion(engine)["r"]
    assert len(engine.executor.plans) > 3  # chunked prefill, then decodes: each step scored everything again
    assert out.prompt_logprobs[0] is None
    assert [list(d) for d in out.prompt_logprobs[1:]] == [[t, 99] for t in prompt[1:]]
    assert out.outputs[0].logprobs is None  # not asked


def test_a_gap_in_prompt_logprobs_fails_that_request_alone():
    engine = make_engine(LogprobsExecutor(gap_for="bad"))
    engine.add_request("bad", [10, 11, 12], SamplingParams(max_tokens=3, prompt_logprobs=1))
    engine.add_request("good", [20, 21, 22], SamplingParams(max_tokens=3, prompt_logprobs=1))
    finished = run_to_completion(engine)
    assert finished["bad"].outputs[0].finish_reason == "error"
    assert finished["good"].outputs[0].finish_reason == "length"
    assert [list(d)[0] for d in finished["good"].prompt_logprobs[1:]] == [21, 22]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
