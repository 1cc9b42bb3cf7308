"""vLLM's spec-decode counters of every replica summed into one, for /metrics behind the router."""
from __future__ import annotations

import dataclasses
from functools import reduce

from sloserve.spec.speculation import SpecDecodeStats


def add(a: SpecDecodeStats, b: SpecDecodeStats) -> SpecDecodeStats:
    n = max(len(a.accepted_per_pos), len(b.accepted_per_pos))
    pad = lambda xs: list(xs) + [0] * (n - len(xs))  # noqa: E731 - replicas may draft different k
    return SpecDecodeStats(a.num_drafts + b.num_drafts, a.num_draft_tokens + b.num_draft_tokens,
                           a.num_accepted_tokens + b.num_accepted_tokens, a.num_emitted_tokens + b.num_emitted_tokens,
                           [x + y for x, y in zip(pad(a.accepted_per_pos), pad(b.accepted_per_pos))])


def wire_copy(stats: SpecDecodeStats) -> SpecDecodeStats:
    """A copy the replica can send while its step thread keeps counting."""
    return dataclasses.replace(stats, accepted_per_pos=list(stats.accepted_per_pos))


class ReplicaSpecTotals:
    """The sum of each replica's latest counters. A replica that restarted counts from zero again; what it
    had counted before is kept, so the totals never go down (they are Prometheus counters)."""

    def __init__(self) -> None:
        self._latest: dict[int, SpecDecodeStats] = {}
        self._retired = SpecDecodeStats()

    def observe(self, replica: int, stats: SpecDecodeStats | None) -> None:
        if stats is None:
            return
        before = self._latest.get(replica)
        if before is not None and (stats.num_drafts < before.num_drafts or stats.num_draft_tokens < before.num_draft_tokens):
            self._retired = add(self._retired, before)
        self._latest[replica] = stats

    @property
    def stats(self) -> SpecDecodeStats:
        """Read at scrape time, as a single engine's speculator's stats are."""
        return reduce(add, self._latest.values(), self._retired)
