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
from sloserve.request import Request


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


class FCFS:
    """First come, first served: the latest arrival is the first preempted."""

    def rank(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def preempts(self, waiting: Request, running: Request) -> bool:
        return False

    def step_time_limit(self, batch: list[Request]) -> float | None:
        return None


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


class SLOPolicy:
    """Schedules for each request's latency objectives (DistServe's goodput, Sarathi-Serve's budget).

    Waiting requests go by least slack: first-token deadline (arrival + TTFT SLO) minus now minus
    the predicted time of their remaining prefill. Running requests keep their TPOT: the step time
    limit is the tightest TPOT SLO of the decodes in the step, and the scheduler cuts prefill
    chunks to stay within it (decodes first, as always). A request that can no
    longer meet its TTFT is late either way: it ranks after every request that still can (and is
    preempted first), does not constrain the budget, and still completes.
    """

    def __init__(self, clock: Clock, predictor: StepTimeModel, max_num_batched_tokens: int) -> None:
        self.clock = clock
        self.predictor = predictor
        self.budget = max_num_batched_tokens

    def prefill_seconds(self, num_tokens: int, context: int = 0) -> float:
        """Predicted time to compute `num_tokens` prompt tokens alone, in chunks of the token budget."""
        seconds, done = 0.0, 0
        while done < num_tokens:
            chunk = min(self.budget, num_tokens - done)
            seconds += self.predictor.step_seconds(StepShape([chunk], [context + done], [done + chunk == num_tokens]))
            done += chunk
        return seconds

    def is_late(self, request: Request, now: float) -> bool:
        ttft = request.slo.ttft if request.slo else None
        if ttft is None:
            return False
        deadline = request.arrival_time + ttft
        if request.token_times:
            return request.token_times[0] > deadline
        remaining = request.num_tokens - request.num_computed_tokens
        return now + self.prefill_seconds(remaining, request.num_computed_tokens) > deadline

    def rank(self, request: Request) -> tuple:
        now = self.clock.now()
        if request.token_times:  # decoding: the loosest TPOT is preempted first
            tpot = request.slo.tpot if request.slo and request.slo.tpot is not None else math.inf
            return (self.is_late(request, now), 0, tpot, request.arrival_time)
        ttft = request.slo.ttft if request.slo and request.slo.ttft is not None else math.inf
        remaining = request.num_tokens - request.num_computed_tokens
        slack = request.arrival_time + ttft - now - self.prefill_seconds(remaining, request.num_computed_tokens)
        late = slack < 0
        return (late, 1, math.inf if late else slack, request.arrival_time)

    def preempts(self, waiting: Request, running: Request) -> bool:
        now = self.clock.now()
        return self.is_late(running, now) and not self.is_late(waiting, now)

    def step_time_limit(self, batch: list[Request]) -> float | None:
        now = self.clock.now()
        tpots = [r.slo.tpot for r in batch
                 if r.token_times and r.slo and r.slo.tpot is not None and not self.is_late(r, now)]
        return min(tpots, default=None)


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
