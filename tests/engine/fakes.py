"""Test doubles for the engine's seams (an executor that counts, a clock that ticks, a tokenizer of letters),
and a loop that steps an engine until every request has finished."""
from sloserve.engine.scheduler import SchedulerOutput


class CountingExecutor:
    """Samples `last token + 1` for every request that reaches the end of its tokens."""

    def __init__(self, num_kv_blocks: int = 64) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.plans: list[SchedulerOutput] = []

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        self.plans.append(plan)
        return [[s.token_ids[-1] + 1] if s.samples else [] for s in plan.scheduled]


class TickingClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        self.t += 0.001
        return self.t


class LetterTokenizer:
    """Token i is the letter chr(ord('a') + i % 26); token 0 is a special token."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == 0))


def run_to_completion(engine) -> dict:
    """Step until nothing is left; the final output of each request, by id."""
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished
