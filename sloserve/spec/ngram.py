"""N-gram (prompt lookup) proposer: continue the text the way its last n-gram continued earlier."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.spec.draft_cost import ngram_seconds
from sloserve.spec.proposer import DraftRequest


@dataclass(slots=True)
class NgramIndex:
    """Where each `min_n`-gram of a request's tokens ended, in order, for the n-grams ending before `upto`. A request's
    tokens only grow (rejected drafts never join them; a preempted request is forgotten), so each step indexes only
    the tokens it added: a lookup then visits the few earlier occurrences of the last `min_n` tokens instead of
    scanning the whole context (vectorised, that scan still cost ~25 us a row a step, ~3% of a one-request step)."""

    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    upto: int = 0

    def extend(self, tokens: list[int], min_n: int, upto: int) -> None:
        for end in range(max(self.upto, min_n - 1), upto):
            self.ends.setdefault(tuple(tokens[end - min_n + 1 : end + 1]), []).append(end)
        self.upto = max(self.upto, upto)


class NgramProposer:
    """Find the latest earlier occurrence of the last n tokens (n from max down to min) and propose
    the k tokens that followed it. Deterministic, so a draft token's probability is one."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, clock: Clock | None = None) -> None:
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max
        self.clock = clock or MonotonicClock()
        self.draft_probs: dict = {}  # n-gram drafts are deterministic
        self.seconds_per_token = 2e-7  # a lookup scans the context: measured, as a running average
        self._indexes: dict[str, NgramIndex] = {}

    def propose(self, batch: list[DraftRequest]) -> list[list[int]]:
        start = self.clock.now()
        drafts = [self.lookup(r.token_ids, r.k, self._index(r)) for r in batch]
        scanned = sum(len(r.token_ids) for r in batch)
        if scanned:
            self.seconds_per_token += 0.1 * ((self.clock.now() - start) / scanned - self.seconds_per_token)
        return drafts

    def _index(self, request: DraftRequest) -> NgramIndex:
        index = self._indexes.get(request.request_id)
        if index is None or index.upto >= len(request.token_ids):  # new, or fewer tokens than it indexed: rebuilt
            index = self._indexes[request.request_id] = NgramIndex()
        return index

    def predict_seconds(self, ks: list[int], contexts: list[int]) -> float:
        return ngram_seconds(self.seconds_per_token, ks, contexts)

    def lookup(self, tokens: list[int], k: int, index: NgramIndex | None = None) -> list[int]:
        """The continuation of the longest suffix n-gram (n in min..max) seen earlier, its latest occurrence:
        recent context predicts the continuation best. `index`: the request's, kept between steps (default: built
        for this call)."""
        size = len(tokens)
        longest = min(self.max_n, size - 1)
        if longest < self.min_n or k <= 0:
            return []
        index = index if index is not None else NgramIndex()
        index.extend(tokens, self.min_n, size - 1)  # occurrences ending before the last token: earlier ones
        ends = index.ends.get(tuple(tokens[size - self.min_n :]))
        if not ends:
            return []
        # Every occurrence matches the last min_n tokens: extend each backwards, latest first, to the longest.
        best, best_n = -1, 0
        for end in reversed(ends):
            n = self.min_n
            while n < longest and end - n >= 0 and tokens[end - n] == tokens[size - 1 - n]:
                n += 1
            if n > best_n:
                best, best_n = end, n
                if n == longest:
                    break
        return tokens[best + 1 : best + 1 + k]

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._indexes.pop(request_id, None)
