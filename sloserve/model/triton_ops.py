"""A decoder layer's small ops as Triton kernels (the CUDA path): one launch each instead of a chain of
PyTorch ops, which matters once CUDA graphs have removed the CPU's launch cost and each tiny kernel's
own time is what is left. Same arithmetic as ops.TorchOps, rounding to the model dtype where PyTorch would.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# No fused multiply-adds: a product is rounded before it is added, as in PyTorch's separate kernels
# (a GPU would otherwise fuse x * cos + y * sin, even in bfloat16, and drift from the reference).
EXACT = dict(enable_fp_fusion=False)


@triton.jit
def _rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
              BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:  # residual += x, rounded to the model dtype as PyTorch's add_ does
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    normed = (h * tl.rsqrt(tl.sum(h * h, 0) / n + eps)).to(dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _silu_and_mul(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dtype), mask=mask)


@triton.jit
def _rope_and_cache(qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_qkv, stride_cos,
                    stride_sin, stride_k_slot, stride_v_slot, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM_P)
    mask = d < HEAD_DIM
    dtype = qkv_ptr.dtype.element_ty
    row = qkv_ptr + token * stride_qkv + head * HEAD_DIM
    slot = tl.load(slot_ptr + token)
    if head < NUM_HEADS + NUM_KV_HEADS:
        x = tl.load(row + d, mask=mask, other=0.0)
        # rotate_half(x) = [-x2, x1]: the halves swapped, the sign carried by signed_sin.
        swapped = tl.load(row + (d + HEAD_DIM // 2) % HEAD_DIM, mask=mask, other=0.0)
        cos = tl.load(cos_ptr + token * stride_cos + d, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + token * stride_sin + d, mask=mask, other=0.0)
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(dtype)
        b = (swapped.to(tl.float32) * sin.to(tl.float32)).to(dtype)
        rotated = (a.to(tl.float32) + b.to(tl.float32)).to(dtype)
        tl.store(row + d, rotated, mask=mask)
        if head >= NUM_HEADS:
            tl.store(k_cache_ptr + slot * stride_k_slot + (head - NUM_HEADS) * HEAD_DIM + d, rotated, mask=mask)
    else:
        v = tl.load(row + d, mask=mask, other=0.0)
        tl.store(v_cache_ptr + slot * stride_v_slot + (head - NUM_HEADS - NUM_KV_HEADS) * HEAD_DIM + d, v, mask=mask)


class TritonOps:
    """ops.Ops for the CUDA path (attention itself is the Triton attention backend's)."""

    def rms_norm(self, x, weight, eps):
        out = torch.empty_like(x)
        self._norm(x, None, weight, eps, out)
        return out

    def add_rms_norm_(self, x, residual, weight, eps):
        self._norm(x, residual, weight, eps, x)
        return x

    @staticmethod
    def _norm(x, residual, weight, eps, out):
        n = x.shape[-1]
        _rms_norm[(x.shape[0],)](
            x, residual if residual is not None else x, weight, out, x.stride(0),
            residual.stride(0) if residual is not None else 0, out.stride(0), n, eps,
            BLOCK=triton.next_power_of_2(n), ADD_RESIDUAL=residual is not None, **EXACT,
        )

    def silu_and_mul(self, x):
        n = x.shape[-1] // 2
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block, **EXACT)
        return out

    def rope_and_cache_(self, qkv, cos, signed_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        _rope_and_cache[(qkv.shape[0], num_heads + 2 * num_kv_heads)](
            qkv, cos, signed_sin, k_cache, v_cache, slot_mapping, qkv.stride(0), cos.stride(0), signed_sin.stride(0),
            k_cache.stride(0), v_cache.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            HEAD_DIM_P=triton.next_power_of_2(head_dim), **EXACT,
        )
