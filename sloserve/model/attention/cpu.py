"""CPU attention: decode rows batched (C++ kernel through the block tables, or PyTorch ops), a speculative
verification's rows among them one by one, prefill chunks through SDPA over the cached context gathered by slot."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sloserve.model.attention import SequenceRows

if TYPE_CHECKING:
    from sloserve.model.ops import Ops


@dataclass(slots=True)
class PrefillSpan:
    """Rows [start, end) of the batch are one request's prompt chunk."""

    start: int
    end: int
    gather: torch.Tensor | None  # cache slots of the whole context; None: no cached context
    mask: torch.Tensor | None  # [chunk, context] causal mask offset by the cached context


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step and shared by every layer. Decode rows come first in the batch."""

    slot_mapping: torch.Tensor  # [tokens]: cache slot that each new token's key/value goes to
    block_size: int
    num_decodes: int = 0  # decode rows: a decode's one, a verification's k + 1 (see SequenceRows.decodes)
    block_tables: torch.Tensor | None = None  # [decode rows, blocks of the longest context]
    context_lens: torch.Tensor | None = None  # [decode rows]: cached tokens up to and including the row's own
    max_context: int = 0
    prefills: list[PrefillSpan] = field(default_factory=list)
    _padded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def padded_decode_context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cache slots of every decode's context padded to the longest, and the mask hiding the padding
        (None: no padding). Built on first use, then shared by every layer of the step."""
        if self._padded is None:
            bs, longest = self.block_size, self.max_context
            offsets = torch.arange(bs, device=self.block_tables.device)
            gather = (self.block_tables[:, :, None] * bs + offsets).view(self.num_decodes, -1)[:, :longest]
            positions = torch.arange(longest, device=gather.device)[None, :]
            mask = None
            if int(self.context_lens.min()) != longest:
                mask = (positions < self.context_lens[:, None]).view(self.num_decodes, 1, 1, longest)
            self._padded = (gather.reshape(-1), mask)
        return self._padded


class CpuAttention:
    def __init__(self, device: torch.device, block_size: int, ops: Ops) -> None:
        self.device, self.block_size, self.ops = device, block_size, ops

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def prepare(self, seqs: list[SequenceRows], slot_mapping: torch.Tensor) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_size=self.block_size)
        decodes = [s for s in seqs if s.decodes]
        if decodes:
            # A verification's row i attends as the plain decode of its position would, to the context
            # start + i + 1: every row of the step wrote its key and value into the cache before attention.
            contexts = [s.start + i + 1 for s in decodes for i in range(s.num_new)]
            num_blocks = -(-max(contexts) // self.block_size)
            meta.num_decodes = len(contexts)
            meta.max_context = max(contexts)
            meta.context_lens = self._tensor(contexts)
            meta.block_tables = self._tensor(
                [s.block_table[:num_blocks] + [0] * (num_blocks - len(s.block_table)) for s in decodes
                 for _ in range(s.num_new)]
            )
        row = meta.num_decodes
        for s in seqs[len(decodes):]:
            meta.prefills.append(self._prefill_span(row, s))
            row += s.num_new
        return meta

    def _prefill_span(self, row: int, s: SequenceRows) -> PrefillSpan:
        if s.start == 0:  # no cached context: plain causal attention over the chunk itself
            return PrefillSpan(row, row + s.num_new, None, None)
        bs, context = self.block_size, s.start + s.num_new
        gather = self._tensor([s.block_table[p // bs] * bs + p % bs for p in range(context)])
        queries = torch.arange(s.start, context, device=self.device)[:, None]
        mask = torch.arange(context, device=self.device)[None, :] <= queries
        return PrefillSpan(row, row + s.num_new, gather, mask)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        parts = []
        if meta.num_decodes:
            parts.append(self.ops.decode_attention(q[: meta.num_decodes], k_cache, v_cache, meta, scale))
        for span in meta.prefills:
            # [1, heads, tokens, head_dim]: only 4-D inputs reach PyTorch's flash kernel on CPU; 3-D ones
            # fall back to the math path, which is 4-10x slower on a 512-token prompt.
            queries = q[span.start : span.end].transpose(0, 1).unsqueeze(0)
            if span.gather is None:
                keys = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
                values = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
            else:
                keys = k_cache.index_select(0, span.gather).transpose(0, 1).unsqueeze(0)
                values = v_cache.index_select(0, span.gather).transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True
            )
            parts.append(out[0].transpose(0, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
