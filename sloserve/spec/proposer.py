"""The proposer seam: whatever drafts tokens for the target to verify (n-gram lookup, a draft model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sloserve.request import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class DraftRequest:
    """One request to draft for: all its tokens so far, and at most how many drafts it wants."""

    request_id: str
    token_ids: list[int]
    k: int
    sampling_params: SamplingParams


class Proposer(Protocol):
    # Per request, the distributions its sampled drafts came from (empty: deterministic drafts).
    draft_probs: dict[str, "torch.Tensor"]

    def propose(self, batch: list[DraftRequest]) -> list[list[int]]:
        """Up to `k` draft tokens per request (fewer, or none, where the proposer has no guess)."""
        ...

    def forget(self, request_ids: list[str]) -> None:
        """Drop per-request state (draft KV blocks) of requests that ended or were preempted."""
        ...

    def predict_seconds(self, ks: list[int], contexts: list[int]) -> float:
        """Predicted seconds to draft ks[i] tokens for requests holding contexts[i] tokens."""
        ...
