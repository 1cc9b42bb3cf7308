"""N-gram (prompt lookup) proposer: continue the text the way its last n-gram continued earlier."""
from __future__ import annotations

from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.spec.draft_cost import ngram_seconds
from sloserve.spec.proposer import DraftRequest


class NgramProposer:
    """Find the latest earlier occurrence of the last n tokens (n from max down to min) and propose
    the k tokens that followed it. Deterministic, so a draft token's probability is one."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, clock: Clock | None = None) -> None:
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max
        self.clock = clock or MonotonicClock()
        self.draft_probs: dict = {}  # n-gram drafts are deterministic
        self.seconds_per_token = 2e-7  # a lookup scans the context: measured, as a running average

    def propose(self, batch: list[DraftRequest]) -> list[list[int]]:
        start = self.clock.now()
        drafts = [self.lookup(r.token_ids, r.k) for r in batch]
        scanned = sum(len(r.token_ids) for r in batch)
        if scanned:
            self.seconds_per_token += 0.1 * ((self.clock.now() - start) / scanned - self.seconds_per_token)
        return drafts

    def predict_seconds(self, ks: list[int], contexts: list[int]) -> float:
        return ngram_seconds(self.seconds_per_token, ks, contexts)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        size = len(tokens)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            suffix = tokens[size - n:]
            # Latest match first: recent context predicts the continuation best.
            for start in range(size - n - 1, -1, -1):
                if tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + k]
        return []

    def forget(self, request_ids: list[str]) -> None:
        pass  # keeps no per-request state
