"""Attention backends: metadata built once per step, attention run per layer over the paged KV cache.

`cpu` batches decodes through the C++ kernel (or PyTorch ops) and runs prefill chunks through SDPA;
`triton` runs every request of a step, decodes and prefill chunks alike, in one varlen paged kernel
(the CUDA path; on a CPU it runs only under Triton's interpreter, for tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(slots=True)
class SequenceRows:
    """One scheduled request's rows in a step's batch: its tokens [start, start + num_new)."""

    start: int  # tokens already in the KV cache
    num_new: int
    block_table: list[int]
    # The rows are computed as decodes of their positions: a speculative verification's (the last token sampled and
    # k drafts), a greedy draft's short feed, or any span in batch-invariant mode.
    as_decodes: bool = False

    @property
    def decodes(self) -> bool:
        """Whether every row is a decode position (one new token, or a span marked `as_decodes`), which the CPU
        backend computes exactly as a plain decode of that position, whatever else the step holds: so
        speculation and batching change no number."""
        return self.num_new == 1 or self.as_decodes


class AttentionBackend(Protocol):
    def prepare(self, seqs: list[SequenceRows], slot_mapping: torch.Tensor) -> Any:
        """Per-step metadata shared by every layer. `seqs` are in batch-row order, decodes (`decodes`) first;
        the metadata carries `slot_mapping` (each new token's cache slot) for the cache write."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: Any, scale: float) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: this step's new keys/values, already in the cache."""


ATTENTION_BACKENDS = ("auto", "cpu", "triton")


def uses_triton(name: str, device: torch.device) -> bool:
    """`auto`: Triton on CUDA, the CPU backend elsewhere."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    return name == "triton" or (name == "auto" and device.type == "cuda")


def select_backend(name: str, device: torch.device, block_size: int, ops) -> AttentionBackend:
    if uses_triton(name, device):
        from sloserve.model.attention.triton_backend import TritonAttention

        return TritonAttention(device, block_size)
    from sloserve.model.attention.cpu import CpuAttention

    return CpuAttention(device, block_size, ops)
