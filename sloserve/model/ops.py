"""A decoder layer's small ops, fused: in plain PyTorch (the reference) or in sloserve's C++ kernels.

Both compute Hugging Face's arithmetic op by op; the kernels make each of these one call instead of
a chain of 3-10 PyTorch ops, and read decode attention's keys and values in place through the block
table. `select_ops` picks the kernels wherever they build, the PyTorch ops elsewhere.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from sloserve.model.attention.cpu import AttentionMetadata
from sloserve.model.kernels import load_kernels


class Ops(Protocol):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm_(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += x (in place); returns RMSNorm(residual) * weight, possibly written over x."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for x = [gate | up]."""

    def rope_and_cache_(
        self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, k_cache: torch.Tensor,
        v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    ) -> None:
        """Rotates q and k inside the fused [tokens, q|k|v] matrix and stores k and v in their cache slots."""

    def decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q: [decodes, heads, head_dim], one token per request, attending to its cached context.
        (The CPU attention backend's; the Triton backend runs attention itself.)"""


class TorchOps:
    """The reference arithmetic in PyTorch ops (also the fallback where the kernels cannot be built)."""

    def rms_norm(self, x, weight, eps):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def add_rms_norm_(self, x, residual, weight, eps):
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_and_mul(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_and_cache_(self, qkv, cos, signed_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        heads = qkv.view(qkv.shape[0], -1, head_dim)
        qk = heads[:, : num_heads + num_kv_heads]
        # rotate_half(x) = [-x2, x1] is the halves swapped (a roll) times the sign that signed_sin carries.
        cos, signed_sin = cos.unsqueeze(1), signed_sin.unsqueeze(1)
        qk.copy_(qk * cos + qk.roll(head_dim // 2, dims=-1) * signed_sin)
        k_cache.index_copy_(0, slot_mapping, heads[:, num_heads : num_heads + num_kv_heads])
        v_cache.index_copy_(0, slot_mapping, heads[:, num_heads + num_kv_heads :])

    def decode_attention(self, q, k_cache, v_cache, meta, scale):
        n, context = meta.num_decodes, meta.max_context
        num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
        gather, mask = meta.padded_decode_context()
        keys = k_cache.index_select(0, gather).view(n, context, num_kv_heads, head_dim).transpose(1, 2)
        values = v_cache.index_select(0, gather).view(n, context, num_kv_heads, head_dim).transpose(1, 2)
        # One query token per request: fold the query heads sharing a KV head into the query axis,
        # so grouped-query attention needs no repeated keys.
        queries = q.reshape(n, num_kv_heads, -1, head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        return out.reshape(n, -1, head_dim)


class KernelOps:
    """The same ops as TorchOps, each one call into sloserve's compiled kernels (float32, bfloat16)."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm_(self, x, residual, weight, eps):
        self.kernels.add_rms_norm_(x, residual, weight, eps)
        return x

    def silu_and_mul(self, x):
        return self.kernels.silu_and_mul(x)

    def rope_and_cache_(self, qkv, cos, signed_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        self.kernels.rope_and_cache_(qkv, cos, signed_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)

    def decode_attention(self, q, k_cache, v_cache, meta, scale):
        return self.kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.block_size, scale)


def select_ops(dtype: torch.dtype, device: torch.device, use_kernels: bool = True, triton: bool = False) -> Ops:
    """The fused kernels for where the model runs (C++ on a CPU, Triton on the Triton attention path),
    PyTorch ops where those are unavailable or turned off."""
    if use_kernels and triton:
        from sloserve.model.triton_ops import TritonOps

        return TritonOps()
    if use_kernels and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        kernels = load_kernels()
        if kernels is not None:
            return KernelOps(kernels)
    return TorchOps()
