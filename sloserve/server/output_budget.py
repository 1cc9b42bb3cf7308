"""Per-API-key output-token budget: the max_tokens one key may have in flight at once (429 beyond)."""
from __future__ import annotations

from sloserve.server.errors import APIError


class OutputBudget:
    """Bounds what one client can make the server generate at once.

    Inputs crafted to make a model talk as long as it may (the verbose-input latency attack) each
    stay under the per-request cap, so one key sends many: reserving each request's max_tokens
    against its key's budget until the request ends caps the damage one key can do to the rest.
    Without --api-key every client presents no key and they share one budget.
    """

    def __init__(self, per_key: int | None, retry_after_s: int = 1) -> None:
        self.per_key = per_key
        self.retry_after_s = retry_after_s
        self.reserved: dict[str | None, int] = {}

    def reserve(self, key: str | None, tokens: int) -> Lease:
        if self.per_key is not None:
            held = self.reserved.get(key, 0)
            if held + tokens > self.per_key:
                raise APIError(
                    429, f"this API key has {held} output tokens in flight and this request asks for {tokens} more "
                    f"(limit {self.per_key}); retry when some finish", code="output_budget_exceeded",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self.reserved[key] = held + tokens
        return Lease(self, key, tokens if self.per_key is not None else 0)

    def _release(self, key: str | None, tokens: int) -> None:
        left = self.reserved.get(key, 0) - tokens
        if left > 0:
            self.reserved[key] = left
        else:
            self.reserved.pop(key, None)


class Lease:
    """One request's reservation; `release()` may be called from every path that ends it, once counts."""

    __slots__ = ("budget", "key", "tokens")

    def __init__(self, budget: OutputBudget, key: str | None, tokens: int) -> None:
        self.budget, self.key, self.tokens = budget, key, tokens

    def release(self) -> None:
        if self.tokens:
            self.budget._release(self.key, self.tokens)
            self.tokens = 0
