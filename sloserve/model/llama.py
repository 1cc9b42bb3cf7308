"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) over a flat batch of tokens.

All requests' tokens of a step are one [tokens, hidden] matrix, so every projection is one matmul
whatever the mix of prefill chunks and decodes; only attention looks at request boundaries.
Projections sharing an input are fused (q|k|v, gate|up) to halve the matmul calls per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sloserve.model.attention import AttentionMetadata, paged_attention
from sloserve.model.linear import Linear


@dataclass(slots=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool  # Qwen2, or attention_bias
    o_bias: bool  # attention_bias (Llama)
    qk_norm: bool  # Qwen3
    tie_word_embeddings: bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hugging Face's arithmetic (float32 statistics, weight applied in the model dtype), written
        # out: in PyTorch 2.13 F.rms_norm costs ~40 us a call on CPU, these few ops ~8 us.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout) in three ops.

    rotate_half(x) = [-x2, x1] is roll(x) = [x2, x1] times the sign carried by `signed_sin`, so the
    result equals Hugging Face's x*cos + rotate_half(x)*sin bit for bit. cos/sin: [tokens, 1, head_dim].
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_size, self.kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.scale = s.head_dim**-0.5
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.qkv_proj = Linear(s.hidden_size, self.q_size + 2 * self.kv_size, bias=s.qkv_bias)
        self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps) if s.qk_norm else None
        self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps) if s.qk_norm else None
        self.o_proj = Linear(self.q_size, s.hidden_size, bias=s.o_bias)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.gate_up_proj = Linear(s.hidden_size, 2 * s.intermediate_size, bias=False)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])), dim=1)
        # Queries and keys rotate together: one pass of RoPE's elementwise ops instead of two.
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        x = x + self.o_proj(attn.reshape(t, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaForCausalLM(nn.Module):
    def __init__(self, s: ModelShape, inv_freq: torch.Tensor, rope_scaling: float, max_positions: int) -> None:
        super().__init__()
        self.shape = s
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.lm_head = Linear(s.hidden_size, s.vocab_size, bias=False)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Same arithmetic as Hugging Face (float32 angles, then cast), tabulated once per position.
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * rope_scaling
        half = sin.shape[-1] // 2
        self.register_buffer("cos_table", emb.cos() * rope_scaling, persistent=False)
        self.register_buffer("signed_sin_table", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def pack_weights(self) -> None:
        """Call once the weights are final (loaded, cast): lays them out for the fastest matmul."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        sample_rows: torch.Tensor,  # rows whose next-token logits are wanted
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos = self.cos_table[positions].to(x.dtype).unsqueeze(1)
        sin = self.signed_sin_table[positions].to(x.dtype).unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, k_cache, v_cache)
        # Only sampled rows need the vocabulary projection: a prefill chunk needs one row, not all.
        return self.lm_head(self.norm(x.index_select(0, sample_rows))).float()
