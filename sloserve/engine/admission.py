"""Admission by predicted TTFT: refuse at arrival a request that, behind everything ahead of it, would miss its SLO."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from sloserve.engine.cost import StepTimeModel, largest_chunk
from sloserve.engine.features import StepShape
from sloserve.engine.policy import Policy
from sloserve.engine.scheduler import Scheduler
from sloserve.request import Request


@dataclass(slots=True)
class LoadSnapshot:
    """What admission needs of the engine's state, taken between steps (so another thread may read it)."""

    decode_contexts: list[int] = field(default_factory=list)  # running requests past their prefill
    running_prefill_tokens: int = 0  # prompt tokens running requests still have to compute
    waiting: list[tuple[tuple, int]] = field(default_factory=list)  # (policy rank, tokens to its first token)
    step_time_limit: float | None = None  # the policy's limit for the running batch

    @classmethod
    def of(cls, scheduler: Scheduler) -> LoadSnapshot:
        snap = cls(step_time_limit=scheduler.policy.step_time_limit(scheduler.running))
        for r in scheduler.running:
            remaining = r.num_tokens - r.num_computed_tokens
            if r.output_token_ids and remaining <= 1:
                snap.decode_contexts.append(r.num_computed_tokens)
            else:
                snap.running_prefill_tokens += remaining
        snap.waiting = [(scheduler.policy.rank(r), r.num_tokens - r.num_computed_tokens) for r in scheduler.waiting]
        return snap


@dataclass(slots=True)
class Verdict:
    predicted_ttft: float
    tokens_ahead: int
    reject: str | None = None  # why the request is refused; None: admitted
    retry_after_s: int = 0


class TTFTAdmission:
    """Predicts a new request's TTFT: the prefill of every request its policy serves first, then its own.

    Steps are modelled as the running decodes plus one prefill chunk (the budget left by the
    decodes, cut to the policy's step time limit); decodes that end meanwhile and later arrivals
    that rank ahead are not foreseen. A request with no TTFT objective is always admitted.
    """

    def __init__(self, predictor: StepTimeModel, policy: Policy, max_num_batched_tokens: int, min_chunk: int = 16) -> None:
        self.predictor = predictor
        self.policy = policy
        self.budget = max_num_batched_tokens
        self.min_chunk = min_chunk

    def predict(self, snapshot: LoadSnapshot, request: Request, extra_tokens_ahead: int = 0) -> tuple[float, int]:
        """(predicted TTFT in seconds from now, prompt tokens computed before its first token)."""
        rank = self.policy.rank(request)
        ahead = snapshot.running_prefill_tokens + extra_tokens_ahead
        ahead += sum(tokens for r, tokens in snapshot.waiting if r <= rank)
        total = ahead + request.num_tokens - request.num_computed_tokens
        d = len(snapshot.decode_contexts)
        decodes = StepShape([1] * d, list(snapshot.decode_contexts), [True] * d)
        chunk = max(1, self.budget - d)
        if snapshot.step_time_limit is not None and chunk > self.min_chunk:
            chunk = largest_chunk(self.predictor, decodes, 0, chunk, self.min_chunk, snapshot.step_time_limit)
        full, rest = divmod(total, chunk)
        seconds = full * self._step(decodes, chunk) + (self._step(decodes, rest) if rest else 0.0)
        return seconds, ahead

    def _step(self, decodes: StepShape, chunk: int) -> float:
        return self.predictor.step_seconds(StepShape(decodes.new_tokens + [chunk], decodes.contexts + [0],
                                                     decodes.samples + [True]))

    def check(self, snapshot: LoadSnapshot, request: Request, extra_tokens_ahead: int = 0) -> Verdict:
        predicted, ahead = self.predict(snapshot, request, extra_tokens_ahead)
        ttft = request.slo.ttft if request.slo else None
        if ttft is None or predicted <= ttft:
            return Verdict(predicted, ahead)
        why = (f"its predicted time to first token is {predicted * 1e3:.0f} ms ({ahead} prompt tokens ahead of it), "
               f"over its TTFT objective of {ttft * 1e3:.0f} ms")
        return Verdict(predicted, ahead, why, max(1, math.ceil(predicted - ttft)))
