"""An approximate record of which replica holds which prompt prefixes (SGLang's cache-aware routing).

The router does not ask replicas what they cache: it remembers the block chains it sent each one,
bounded and least recently used first out, as a replica's own prefix cache evicts.
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixTracker:
    def __init__(self, max_blocks_per_replica: int = 4096) -> None:
        self.max_blocks = max_blocks_per_replica
        self._held: dict[int, OrderedDict[int, None]] = {}

    def matched_blocks(self, replica: int, hashes: list[int]) -> int:
        """How many leading blocks of the chain the replica is believed to hold."""
        held = self._held.get(replica)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def record(self, replica: int, hashes: list[int]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def forget(self, replica: int) -> None:
        """A replica that restarted holds nothing."""
        self._held.pop(replica, None)
