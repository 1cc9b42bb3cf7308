"""Paged attention: write new keys/values into the block-indexed cache, attend through block tables."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    num_decodes: int = 0
    decode_gather: torch.Tensor | None = None  # [decodes * max_context] cache slots, padded
    decode_context: int = 0  # max_context
    decode_mask: torch.Tensor | None = None  # [decodes, 1, 1, max_context]; None: no padding
    prefills: list[PrefillSpan] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # [tokens, heads, head_dim]
    k: torch.Tensor,  # [tokens, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv_heads
    parts = []
    if meta.num_decodes:
        n, ctx = meta.num_decodes, meta.decode_context
        keys = k_cache.index_select(0, meta.decode_gather).view(n, ctx, num_kv_heads, head_dim).transpose(1, 2)
        values = v_cache.index_select(0, meta.decode_gather).view(n, ctx, num_kv_heads, head_dim).transpose(1, 2)
        # One query token per request: fold the query heads sharing a KV head into the query
        # axis, so grouped-query attention needs no repeated keys.
        queries = q[:n].view(n, num_kv_heads, group, head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.decode_mask, scale=scale)
        parts.append(out.reshape(n, -1, head_dim))
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
