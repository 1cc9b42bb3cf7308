"""Scheduling policies: the order of admission and preemption, and the share of a step's token budget.

A policy ranks requests; the scheduler admits in rank order and preempts the worst-ranked running
request when the KV cache cannot grow. A policy may also let a blocked waiting request preempt a
running one, and set a time limit on a step, which the scheduler meets by cutting prefill chunks. Policies are built with the
engine's clock and step-time predictor, so they can reason about deadlines.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from sloserve.engine.clock import Clock
from sloserve.engine.cost import StepTimeModel
from sloserve.engine.features import StepShape
from sloserve.request import Request, RequestStatus


class Policy(Protocol):
    def rank(self, request: Request) -> tuple:
        """Sort key: smaller ranks are served first and preempted last."""
        ...

    def preempts(self, waiting: Request, running: Request) -> bool:
        """Whether `waiting`, blocked for KV blocks or a seat, may preempt `running`."""
        ...

    def step_time_limit(self, batch: list[Request]) -> float | None:
        """Seconds a step holding `batch` should not exceed (prefill chunks are cut to fit); None: no limit."""
        ...

    def prefill_rate(self, running: list[Request], waiting: list[Request]) -> float:
        """Prompt tokens a second that cutting chunks to the step time limit must still leave (0: none)."""
        ...


class FCFS:
    """First come, first served: the latest arrival is the first preempted."""

    def rank(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def preempts(self, waiting: Request, running: Request) -> bool:
        return False

    def step_time_limit(self, batch: list[Request]) -> float | None:
        return None

    def prefill_rate(self, running: list[Request], waiting: list[Request]) -> float:
        return 0.0


class PriorityPolicy:
    """Lower `priority` value first (vLLM's convention), then arrival order.

    A blocked waiting request preempts running ones of strictly lower priority; the preempted
    request keeps its arrival time, so it returns ahead of everything of its priority that came
    later (it is not sent to the back of the line, where a stream of arrivals could starve it).
    """

    def rank(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)

    def preempts(self, waiting: Request, running: Request) -> bool:
        return waiting.priority < running.priority

    def step_time_limit(self, batch: list[Request]) -> float | None:
        return None

    def prefill_rate(self, running: list[Request], waiting: list[Request]) -> float:
        return 0.0


class SLOPolicy:
    """Schedules for each request's latency objectives (DistServe's goodput, Sarathi-Serve's budget).

    Waiting requests go by least slack: first-token deadline (arrival + TTFT SLO) minus now minus
    the predicted time of their remaining prefill (after any cached prefix). Running requests keep
    their TPOT: the step time limit is the tightest TPOT SLO of the decodes in the step, and the
    scheduler cuts prefill chunks to stay within it (decodes first, as always), but only as far as
    the waiting requests' first-token deadlines allow (`prefill_rate`). A waiting request blocked for a seat or
    blocks preempts a decode with a looser TPOT that can afford the pause (it returns ranked by
    that slack, not to the back of the line) as often as that slack allows, or a late one, once. A request that can no longer meet its TTFT is late
    either way: it ranks after every request that still can (and is preempted first), does not
    constrain the budget, and still completes.
    """

    def __init__(self, clock: Clock, predictor: StepTimeModel, max_num_batched_tokens: int) -> None:
        self.clock = clock
        self.predictor = predictor
        self.budget = max_num_batched_tokens
        # Every step ranks every waiting request: remember predictions until the predictor is refitted.
        self._memo: dict[tuple[int, int], float] = {}
        self._memo_model: object = None

    def prefill_seconds(self, num_tokens: int, context: int = 0) -> float:
        """Predicted time to compute `num_tokens` prompt tokens alone, in chunks of the token budget."""
        model = getattr(self.predictor, "model", self.predictor)
        if model is not self._memo_model or len(self._memo) > 1 << 16:
            self._memo.clear()
            self._memo_model = model
        seconds = self._memo.get((num_tokens, context))
        if seconds is None:
            seconds, done = 0.0, 0
            while done < num_tokens:
                chunk = min(self.budget, num_tokens - done)
                seconds += self.predictor.step_seconds(StepShape([chunk], [context + done], [done + chunk == num_tokens]))
                done += chunk
            self._memo[(num_tokens, context)] = seconds
        return seconds

    def is_late(self, request: Request, now: float) -> bool:
        ttft = request.slo.ttft if request.slo else None
        if ttft is None:
            return False
        deadline = request.arrival_time + ttft
        if request.token_times:
            return request.token_times[0] > deadline
        start = prefill_start(request)
        return now + self.prefill_seconds(request.num_tokens - start, start) > deadline

    def rank(self, request: Request) -> tuple:
        now = self.clock.now()
        if request.token_times and request.status is RequestStatus.RUNNING:
            # Decoding: the loosest TPOT is preempted first.
            return (self.is_late(request, now), 0, _tpot(request), request.arrival_time)
        if request.token_times:  # preempted after its first token: its TPOT sets how long it may wait
            return (self.is_late(request, now), 1, self.resume_slack(request, now), request.arrival_time)
        ttft = request.slo.ttft if request.slo and request.slo.ttft is not None else math.inf
        start = prefill_start(request)
        slack = request.arrival_time + ttft - now - self.prefill_seconds(request.num_tokens - start, start)
        late = slack < 0
        return (late, 1, math.inf if late else slack, request.arrival_time)

    def resume_slack(self, request: Request, now: float) -> float:
        """How long a started request may pause and still meet its mean TPOT (its last token by first +
        TPOT x (max_tokens - 1)), after recomputing its tokens and decoding the rest one token a step."""
        tpot = _tpot(request)
        if math.isinf(tpot):
            return math.inf
        params, done = request.sampling_params, len(request.output_token_ids)
        deadline = request.token_times[0] + tpot * (params.max_tokens - 1)
        start = request.num_cached_tokens  # a preempted request recomputes its tokens the prefix cache lost
        redo = self.prefill_seconds(request.num_tokens - start, start)
        # Its remaining tokens are counted at its TPOT, not at a lone decode's time: it resumes into a batch
        # whose steps take up to the tightest TPOT in it (and more where the limit yields).
        return deadline - now - redo - tpot * (params.max_tokens - done)

    def preempts(self, waiting: Request, running: Request) -> bool:
        """A waiting request that can still be on time takes the place of a late one, or of a decode
        with a looser TPOT objective that can pause for it and still meet that objective."""
        now = self.clock.now()
        if self.is_late(waiting, now):
            return False
        if self.is_late(running, now):
            # Each preemption throws computed tokens away: a late request gives way once, so overload cannot
            # turn into a cycle of recomputing the same late requests.
            return not running.num_preemptions
        # An on-time decode gives way as often as its slack affords the pause, its recompute included; with the
        # seats full of looser decodes that gave way once, tight requests would otherwise wait until they are late.
        return (bool(running.token_times) and _tpot(running) > _tpot(waiting)
                and self.resume_slack(running, now) > self.prefill_seconds(waiting.num_tokens - prefill_start(waiting)))

    def step_time_limit(self, batch: list[Request]) -> float | None:
        now = self.clock.now()
        tpots = [r.slo.tpot for r in batch
                 if r.token_times and r.slo and r.slo.tpot is not None and not self.is_late(r, now)]
        return min(tpots, default=None)

    def prefill_rate(self, running: list[Request], waiting: list[Request]) -> float:
        """The prompt rate the first-token deadlines need: for each request still on time, the prompt tokens
        served before its first token (prefills under way, then the waiting ones in rank order, its own
        included) over the time left to its deadline; the largest of these.

        Cutting prefill chunks only moves prompt work to later steps; once decodes alone take most of the
        TPOT limit, holding the limit would cut chunks to a few tokens and let the queue grow until every
        waiting request is late, to save running ones a fraction of their TPOT. So the limit cuts only as
        far as the first-token deadlines allow: a request that is late either way constrains nothing, and
        where the deadlines need more than the machine's rate the limit yields entirely (admission, which
        predicts the same chunks, is what refuses such load).
        """
        now, tokens, rate = self.clock.now(), 0, 0.0
        decodes = [r.num_computed_tokens for r in running if r.token_times]
        # Every step pays for its decodes however few prompt tokens it carries (the last chunk is partial).
        fixed = self.predictor.step_seconds(StepShape([1] * len(decodes), decodes, [True] * len(decodes)))
        # `waiting` comes in rank order; requests past their first token pace by TPOT, not by a first-token deadline.
        for r in [r for r in running if not r.token_times] + [r for r in waiting if not r.token_times]:
            start = prefill_start(r)
            tokens += r.num_tokens - start
            ttft = r.slo.ttft if r.slo else None
            if ttft is None or self.is_late(r, now):
                continue
            rate = max(rate, needed_rate(tokens, r.arrival_time + ttft - now, fixed))
        return rate


def needed_rate(tokens: int, seconds_left: float, step_fixed: float) -> float:
    """Prompt tokens a second that compute `tokens` by a deadline `seconds_left` away, in steps that each
    cost `step_fixed` besides their prompt tokens (the last one, partial, too)."""
    return tokens / max(seconds_left - step_fixed, 1e-6)


def prefill_start(request: Request) -> int:
    """Where a request's remaining prefill starts: after its computed tokens, or after the prefix cache's
    hit for a waiting request (which holds no blocks yet, so has computed nothing)."""
    return max(request.num_computed_tokens, request.num_cached_tokens)


def _tpot(request: Request) -> float:
    return request.slo.tpot if request.slo and request.slo.tpot is not None else math.inf


PolicyFactory = Callable[[Clock, StepTimeModel, int], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "fcfs": lambda clock, predictor, budget: FCFS(),
    "priority": lambda clock, predictor, budget: PriorityPolicy(),
    "slo": lambda clock, predictor, budget: SLOPolicy(clock, predictor, budget),
}


def make_policy(name: str, clock: Clock, predictor: StepTimeModel, max_num_batched_tokens: int) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](clock, predictor, max_num_batched_tokens)
