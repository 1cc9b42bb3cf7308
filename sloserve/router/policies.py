"""Routing policies: which replica gets the next request (round robin, least loaded, least predicted TTFT)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sloserve.router.load import ReplicaLoad


@dataclass(slots=True)
class Candidate:
    """A ready replica as the router sees it for one request."""

    load: ReplicaLoad
    pending_requests: int = 0  # routed to it but not yet in its load report
    pending_tokens: int = 0
    predicted_ttft: float = 0.0  # seconds, through the replica's step-time model
    cached_tokens: int = 0  # prompt tokens the router believes its prefix cache holds

    @property
    def replica(self) -> int:
        return self.load.replica

    @property
    def outstanding(self) -> int:
        return self.load.num_running + self.load.num_waiting + self.pending_requests


class RoutingPolicy(Protocol):
    def choose(self, candidates: list[Candidate]) -> Candidate:
        """One of `candidates` (never empty; in replica order)."""
        ...


class RoundRobin:
    """Each replica in turn, skipping those not ready."""

    def __init__(self) -> None:
        self._last = -1

    def choose(self, candidates: list[Candidate]) -> Candidate:
        after = [c for c in candidates if c.replica > self._last]
        chosen = after[0] if after else candidates[0]
        self._last = chosen.replica
        return chosen


class LeastLoaded:
    """Fewest requests outstanding (running, waiting, in flight to it), then fewest waiting prompt tokens."""

    def choose(self, candidates: list[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: (c.outstanding, c.load.num_waiting_tokens + c.pending_tokens, c.replica))


class LeastPredictedTTFT:
    """Least predicted TTFT; among replicas within a near-tie of the best, the one with the fewest requests
    outstanding, and among those the one caching the longest prefix of the prompt (the next such prompt's
    prefill is shorter there too).

    A near-tie is within `tie_ratio` of the best or `tie_s` seconds of it: predictions are that rough. The
    prediction already counts a cached prefix as computed, so a cache hit must not also outrank load in a
    tie: with short prompts that repeat, it piled each prompt's repeats onto one replica behind more work.
    """

    def __init__(self, tie_ratio: float = 0.10, tie_s: float = 0.005) -> None:
        self.tie_ratio = tie_ratio
        self.tie_s = tie_s

    def choose(self, candidates: list[Candidate]) -> Candidate:
        best = min(c.predicted_ttft for c in candidates)
        near = [c for c in candidates if c.predicted_ttft <= max(best * (1 + self.tie_ratio), best + self.tie_s)]
        return min(near, key=lambda c: (c.outstanding, -c.cached_tokens, c.predicted_ttft, c.replica))


ROUTERS = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "slo": LeastPredictedTTFT}


def make_routing_policy(name: str) -> RoutingPolicy:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name]()
