"""One Triton kernel for a whole step's attention: every request's queries (a decode's one token or a
prefill chunk's many) attend to its keys and values read in place through its block table.

Each program takes one request, one KV head and a tile of its queries; the query heads sharing that KV
head are folded into the tile's rows (grouped-query attention without repeated keys). Keys are read in
tiles of TILE_N positions, each position's slot looked up in the block table, so any block size works.
Online softmax (flash attention) in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, scale,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_k_slot, stride_k_head,
    stride_v_slot, stride_v_head, stride_table,
    BLOCK_SIZE: tl.constexpr, QUERIES_PER_KV: tl.constexpr, QPK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)  # cached tokens, this step's included
    context = seq_len - q_len  # position of the request's first query

    m = tl.arange(0, BLOCK_M)
    q_tok = q_tile * BLOCK_Q + m // QPK_P
    head = kv_head * QUERIES_PER_KV + m % QPK_P
    row_ok = (q_tok < q_len) & (m % QPK_P < QUERIES_PER_KV)
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + q_tok)[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = context + q_tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    # Keys past the tile's last query are masked for all its rows: stop reading there.
    kv_end = tl.minimum(seq_len, context + (q_tile + 1) * BLOCK_Q)
    for start_n in range(0, kv_end, TILE_N):
        n = start_n + tl.arange(0, TILE_N)
        n_ok = n < kv_end
        block = tl.load(block_tables_ptr + seq * stride_table + n // BLOCK_SIZE, mask=n_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        k = tl.load(k_cache_ptr + slot[None, :] * stride_k_slot + kv_head * stride_k_head + d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        # Key 0 is visible to every row, so each row's running max is finite after the first tile.
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] * stride_v_slot + kv_head * stride_v_head + d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + q_tok)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention(
    q: torch.Tensor,  # [tokens, heads, head_dim], rows of each request contiguous, in request order
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [requests, blocks] int32
    query_start_loc: torch.Tensor,  # [requests + 1] int32: request i's rows are [loc[i], loc[i + 1])
    seq_lens: torch.Tensor,  # [requests] int32: cached tokens after this step
    max_query_len: int,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    per_kv = heads // kv_heads
    per_kv_p = triton.next_power_of_2(per_kv)
    # Decodes: one query token, its head group padded to the 16 rows a tensor-core product needs;
    # prefill chunks: ~64 rows of (token, head) pairs per program.
    block_q = 1 if max_query_len == 1 else max(1, 64 // per_kv_p)
    block_m = max(16, block_q * per_kv_p)
    if out is None:
        out = torch.empty_like(q)
    grid = (seq_lens.shape[0], kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_attention[grid](
        out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        BLOCK_SIZE=block_size, QUERIES_PER_KV=per_kv, QPK_P=per_kv_p, BLOCK_Q=block_q, BLOCK_M=block_m,
        TILE_N=64 if max_query_len > 1 else 32, HEAD_DIM=head_dim, HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        # float32 stays float32 (no TF32), so results match the reference arithmetic.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
