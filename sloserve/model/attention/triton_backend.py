"""The Triton attention backend (CUDA): varlen metadata for the whole step, one kernel call per layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sloserve.model.attention import SequenceRows
from sloserve.model.attention.triton_kernel import paged_attention


@dataclass(slots=True)
class VarlenMetadata:
    slot_mapping: torch.Tensor  # [tokens] int64: each new token's cache slot
    query_start_loc: torch.Tensor  # [requests + 1] int32
    seq_lens: torch.Tensor  # [requests] int32: cached tokens after this step
    block_tables: torch.Tensor  # [requests, blocks] int32
    max_query_len: int
    block_size: int


class TritonAttention:
    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device, self.block_size = device, block_size

    def prepare(self, seqs: list[SequenceRows], slot_mapping: torch.Tensor) -> VarlenMetadata:
        block_size = self.block_size
        starts, lens = [0], []
        for s in seqs:
            starts.append(starts[-1] + s.num_new)
            lens.append(s.start + s.num_new)
        width = -(-max(lens) // block_size)
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table)) for s in seqs]
        as_int32 = dict(dtype=torch.int32, device=self.device)
        return VarlenMetadata(
            slot_mapping=slot_mapping, query_start_loc=torch.tensor(starts, **as_int32),
            seq_lens=torch.tensor(lens, **as_int32), block_tables=torch.tensor(tables, **as_int32),
            max_query_len=max(s.num_new for s in seqs), block_size=block_size,
        )

    def forward(self, q, k, v, k_cache, v_cache, meta: VarlenMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                               meta.max_query_len, meta.block_size, scale)
