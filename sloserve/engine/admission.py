"""Admission by predicted TTFT: refuse at arrival a request that, behind everything ahead of it, would miss its SLO."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from sloserve.engine.cost import StepTimeModel, prefill_chunk
from sloserve.engine.features import StepShape
from sloserve.engine.kv_cache import PrefixCacheIndex
from sloserve.engine.policy import make_policy, needed_rate, prefill_start
from sloserve.engine.scheduler import Scheduler
from sloserve.request import Request


@dataclass(slots=True)
class LoadSnapshot:
    """What admission needs of the engine's state, taken between steps (so another thread may read it)."""

    decode_contexts: list[int] = field(default_factory=list)  # running requests past their prefill
    running_prefill_tokens: int = 0  # prompt tokens running requests still have to compute
    waiting: list[tuple[tuple, int]] = field(default_factory=list)  # (policy rank, tokens to its first token)
    step_time_limit: float | None = None  # the policy's limit for the running batch
    prefill_rate: float = 0.0  # the prompt rate the policy keeps under that limit (policy.prefill_rate)
    free_seats: int = 1 << 30  # max_num_seqs - running
    # Steps until each running request ends (max_tokens left), ascending: when seats free up.
    steps_to_free: list[int] = field(default_factory=list)
    # A copy of the prefix cache's index: a candidate's prefill starts after its cached prefix.
    prefix_cache: PrefixCacheIndex | None = None
    # The engine clock's time when taken: the `now` the waiting requests' policy ranks were computed at.
    taken_at: float = 0.0

    @classmethod
    def of(cls, scheduler: Scheduler, now: float) -> LoadSnapshot:
        snap = cls(taken_at=now, step_time_limit=scheduler.policy.step_time_limit(scheduler.running),
                   prefill_rate=scheduler.policy.prefill_rate(scheduler.running, scheduler.waiting),
                   free_seats=scheduler.config.max_num_seqs - len(scheduler.running))
        snap.steps_to_free = sorted(r.sampling_params.max_tokens - len(r.output_token_ids) for r in scheduler.running)
        for r in scheduler.running:
            remaining = r.num_tokens - r.num_computed_tokens
            if r.output_token_ids and remaining <= 1:
                snap.decode_contexts.append(r.num_computed_tokens)
            else:
                snap.running_prefill_tokens += remaining
        snap.waiting = [(scheduler.policy.rank(r), r.num_tokens - prefill_start(r)) for r in scheduler.waiting]
        snap.prefix_cache = scheduler.block_manager.frozen_prefix_cache()
        return snap


@dataclass(slots=True)
class Verdict:
    predicted_ttft: float
    tokens_ahead: int
    reject: str | None = None  # why the request is refused; None: admitted
    retry_after_s: int = 0


class _SnapshotClock:
    """Stopped at a snapshot's `taken_at`: the candidate is ranked by the engine's policy at the instant the waiting
    requests' ranks were taken, so the ranks compare (a slack-based rank moves with the clock)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class TTFTAdmission:
    """Predicts a new request's TTFT: the prefill of every request its policy serves first, then its own,
    and no sooner than a seat frees for it (max_num_seqs) if the requests ahead fill them.

    Steps are modelled as the running decodes plus one prefill chunk (the budget left by the
    decodes, cut to the policy's step time limit no further than the prompt rate the deadlines
    need, this request's included, as the scheduler cuts it); a cached prefix is not prefill work
    (the candidate's `num_cached_tokens` is set from the snapshot's copy of the cache); a seat frees when a running request has decoded
    its max_tokens (an upper bound: a stop ends it sooner). Later arrivals that rank ahead, and
    preemptions the policy may make for the candidate, are not foreseen. A request with no TTFT
    objective is always admitted.
    """

    def __init__(self, predictor: StepTimeModel, policy: str, max_num_batched_tokens: int, min_chunk: int = 16) -> None:
        """`policy`: the name of the engine's scheduling policy (its own instance here, on the snapshots' clock)."""
        self.predictor = predictor
        self._clock = _SnapshotClock()
        self.policy = make_policy(policy, self._clock, predictor, max_num_batched_tokens)
        self.budget = max_num_batched_tokens
        self.min_chunk = min_chunk

    def predict(self, snapshot: LoadSnapshot, request: Request, extra_tokens_ahead: int = 0) -> tuple[float, int]:
        """(predicted TTFT in seconds from now, prompt tokens computed before its first token)."""
        self._clock.t = snapshot.taken_at
        if snapshot.prefix_cache is not None and request.sampling_params.prompt_logprobs is None:
            request.num_cached_tokens = snapshot.prefix_cache.num_cached_tokens(request.all_token_ids)
        rank = self.policy.rank(request)
        waiting_ahead = [tokens for r, tokens in snapshot.waiting if r <= rank]
        ahead = snapshot.running_prefill_tokens + extra_tokens_ahead + sum(waiting_ahead)
        own = request.num_tokens - prefill_start(request)
        d = len(snapshot.decode_contexts)
        decodes = StepShape([1] * d, list(snapshot.decode_contexts), [True] * d)
        chunk = max(1, self.budget - d)
        if chunk > self.min_chunk:
            # The chunk the scheduler will cut: to the step time limit, but at the prompt rate the deadlines
            # need, this request's among them once it waits (the limit yields that far).
            rate = snapshot.prefill_rate
            if request.slo is not None and request.slo.ttft is not None:
                rate = max(rate, needed_rate(ahead + own, request.slo.ttft, self.predictor.step_seconds(decodes)))
            chunk = prefill_chunk(self.predictor, decodes, 0, chunk, self.min_chunk, snapshot.step_time_limit, rate)
        seconds = self._prefill(decodes, chunk, ahead + own)
        # The k-th request in line gets the k-th seat to free up; this one is behind those ahead.
        need = len(waiting_ahead) + 1 - snapshot.free_seats
        if need > 0 and snapshot.steps_to_free:
            steps = snapshot.steps_to_free[min(need, len(snapshot.steps_to_free)) - 1]
            step = self.predictor.step_seconds(decodes) if d else self._step(decodes, chunk)
            seconds = max(seconds, steps * step + self._prefill(decodes, chunk, own))
        return seconds, ahead

    def _prefill(self, decodes: StepShape, chunk: int, tokens: int) -> float:
        full, rest = divmod(tokens, chunk)
        return full * self._step(decodes, chunk) + (self._step(decodes, rest) if rest else 0.0)

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
