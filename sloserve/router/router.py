"""The router: keeps each replica's latest load report, predicts TTFT on each, asks the policy, refuses
(with --admission slo) only when no replica can meet the request's TTFT objective."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from sloserve.engine.admission import TTFTAdmission
from sloserve.engine.cost import StepCostModel
from sloserve.engine.kv_cache import chain_hashes
from sloserve.request import SLO, Request, SamplingParams
from sloserve.router.load import ReplicaLoad
from sloserve.router.policies import Candidate, RoutingPolicy
from sloserve.router.prefix import PrefixTracker


class NoReplicaError(RuntimeError):
    """No replica is ready to take a request."""


@dataclass(slots=True)
class Route:
    replica: int | None  # None: refused
    predicted_ttft: float
    reject: str | None = None
    retry_after_s: int = 1


class RouteRefused(Exception):
    """--admission slo: no replica is predicted to meet the request's TTFT objective."""

    def __init__(self, route: Route) -> None:
        super().__init__(route.reject)
        self.route = route


class Router:
    def __init__(self, policy: RoutingPolicy, num_replicas: int, *, admission: bool = False,
                 prefix: PrefixTracker | None = None) -> None:
        self.policy = policy
        self.admission = admission
        self.prefix = prefix or PrefixTracker()
        self.loads = {i: ReplicaLoad(i, ready=False) for i in range(num_replicas)}
        self._sent = [0] * num_replicas  # requests routed since the replica (re)started
        self._unreported: list[deque[int]] = [deque() for _ in range(num_replicas)]  # their prompt tokens
        self._models: dict[int, tuple[tuple, TTFTAdmission]] = {}
        self._reported_at = [0.0] * num_replicas  # when each report arrived (the `now` of `route`)

    def update(self, load: ReplicaLoad, now: float = 0.0) -> None:
        """A fresh load report, arrived at `now`; requests it has received leave the router's in-flight count."""
        i = load.replica
        self._reported_at[i] = now
        if not load.ready or (self.loads[i].ready and load.num_received < self.loads[i].num_received):
            self.mark_down(i)  # down, or restarted since the last report: its queue and cache are gone
        self.loads[i] = load
        if not load.ready:
            return
        in_flight = max(0, self._sent[i] - load.num_received)
        while len(self._unreported[i]) > in_flight:
            self._unreported[i].popleft()

    def mark_down(self, replica: int) -> None:
        self.loads[replica].ready = False
        self._sent[replica] = 0
        self._unreported[replica].clear()
        self.prefix.forget(replica)

    @property
    def ready_replicas(self) -> list[int]:
        return [i for i, load in self.loads.items() if load.ready]

    def route(self, prompt_token_ids: list[int], slo: SLO | None = None, *, params: SamplingParams | None = None,
              priority: int = 0, now: float = 0.0, exclude: frozenset[int] = frozenset()) -> Route:
        """Choose a replica for the request and count it as sent there (call `sent` only on a retry)."""
        candidates = [self._candidate(load, prompt_token_ids, params, priority, slo, now)
                      for i, load in self.loads.items() if load.ready and i not in exclude]
        if not candidates:
            raise NoReplicaError("no replica is ready")
        ttft = slo.ttft if slo is not None else None
        if self.admission and ttft is not None:
            meeting = [c for c in candidates if c.predicted_ttft <= ttft]
            if not meeting:
                best = min(c.predicted_ttft for c in candidates)
                why = (f"its predicted time to first token is {best * 1e3:.0f} ms on the least loaded of "
                       f"{len(candidates)} replicas, over its TTFT objective of {ttft * 1e3:.0f} ms")
                return Route(None, best, why, max(1, math.ceil(best - ttft)))
            candidates = meeting
        chosen = self.policy.choose(candidates)
        self.sent(chosen.replica, prompt_token_ids)
        return Route(chosen.replica, chosen.predicted_ttft)

    def sent(self, replica: int, prompt_token_ids: list[int]) -> None:
        self._sent[replica] += 1
        self._unreported[replica].append(len(prompt_token_ids))
        self.prefix.record(replica, chain_hashes(prompt_token_ids, self.loads[replica].block_size))

    def _candidate(self, load: ReplicaLoad, prompt: list[int], params: SamplingParams | None, priority: int,
                   slo: SLO | None, now: float) -> Candidate:
        pending = self._unreported[load.replica]
        c = Candidate(load, len(pending), sum(pending))
        c.cached_tokens = self.prefix.matched_blocks(load.replica, chain_hashes(prompt, load.block_size)) * load.block_size
        age = max(0.0, now - self._reported_at[load.replica])
        predictor = self._predictor(load)
        if predictor is not None:
            # It arrives `age` after the snapshot, on the replica's clock (which need not be the front's).
            request = Request("routing-candidate", prompt, params or SamplingParams(), load.snapshot.taken_at + age,
                              priority, slo)
            request.num_computed_tokens = min(c.cached_tokens, max(0, len(prompt) - 1))
            c.predicted_ttft, _ = predictor.predict(load.snapshot, request, c.pending_tokens)
        # The queue is predicted from the next step on; the step in progress holds the replica until it ends.
        # With short prompts that one step is most of a request's TTFT, and it differs between replicas.
        c.predicted_ttft += max(0.0, load.busy_s - age)
        return c

    def _predictor(self, load: ReplicaLoad) -> TTFTAdmission | None:
        """The replica's TTFT prediction: its step-time model, and its policy to rank a new request among its queue."""
        if not load.coefficients:
            return None
        key = (load.coefficients, load.policy)
        known = self._models.get(load.replica)
        if known is None or known[0] != key:
            model = StepCostModel(load.knots, list(load.coefficients))
            known = (key, TTFTAdmission(model, load.policy, load.max_num_batched_tokens))
            self._models[load.replica] = known
        return known[1]
