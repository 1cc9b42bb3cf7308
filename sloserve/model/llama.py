"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) over a flat batch of tokens.

All requests' tokens of a step are one [tokens, hidden] matrix, so every projection is one matmul
whatever the mix of prefill chunks and decodes; only attention looks at request boundaries.
Projections sharing an input are fused (q|k|v, gate|up) to halve the matmul calls per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sloserve.model.attention import AttentionBackend
from sloserve.model.attention.cpu import AttentionMetadata
from sloserve.model.decode_stack import DecodeStack
from sloserve.model.linear import Linear
from sloserve.model.ops import Ops


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
    """Holds the weight; the arithmetic is the model's ops (Hugging Face's: float32 statistics)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class DecoderLayer(nn.Module):
    """Pre-norm attention and SwiGLU MLP. The residual stream travels beside the hidden state, so each
    residual add fuses with the norm after it (vLLM's fused_add_rms_norm)."""

    def __init__(self, s: ModelShape, ops: Ops, attention: AttentionBackend) -> None:
        super().__init__()
        self.ops, self.attention = ops, attention
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

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache, decode_rows: int = 0):
        """x: the last layer's output, not yet added to `residual` (None before the first layer);
        decode_rows: its first rows that are decode positions (Linear.forward)."""
        ops, t, d = self.ops, x.shape[0], decode_rows
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, ops.rms_norm(x, norm.weight, norm.eps)
        else:
            h = ops.add_rms_norm_(x, residual, norm.weight, norm.eps)
        qkv = self.qkv_proj(h, d)
        if self.q_norm is not None:
            self._qk_norm_(qkv)
        ops.rope_and_cache_(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim)
        heads = qkv.view(t, -1, self.head_dim)
        q, k, v = heads.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        attn = self.attention.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        norm = self.post_attention_layernorm
        h = ops.add_rms_norm_(self.o_proj(attn.reshape(t, self.q_size), d), residual, norm.weight, norm.eps)
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(h, d)), d), residual

    def _qk_norm_(self, qkv: torch.Tensor) -> None:
        """Qwen3: RMSNorm over each query and key head, before RoPE, in place."""
        heads = qkv.view(qkv.shape[0], -1, self.head_dim)
        queries, keys = heads[:, : self.num_heads], heads[:, self.num_heads : self.num_heads + self.num_kv_heads]
        for norm, part in ((self.q_norm, queries), (self.k_norm, keys)):
            normed = self.ops.rms_norm(part.reshape(-1, self.head_dim), norm.weight, norm.eps)
            part.copy_(normed.view_as(part))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, s: ModelShape, inv_freq: torch.Tensor, rope_scaling: float, max_positions: int, ops: Ops,
        attention: AttentionBackend,
    ) -> None:
        super().__init__()
        self.shape = s
        self.ops, self.attention = ops, attention
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s, ops, attention) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.lm_head = Linear(s.hidden_size, s.vocab_size, bias=False)
        self.decode_stack: DecodeStack | None = None  # set by prepare_weights where the kernels run
        if s.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Same arithmetic as Hugging Face (float32 angles, then cast), tabulated once per position.
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * rope_scaling
        half = sin.shape[-1] // 2
        self.register_buffer("cos_table", emb.cos() * rope_scaling, persistent=False)
        self.register_buffer("signed_sin_table", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def prepare_weights(self, kernels, isa: str, quantization: str | None) -> None:
        """Call once the weights are final (loaded, cast): quantizes them if asked, picks the matmul kernel."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare(kernels, isa, quantization)
        self.decode_stack = DecodeStack(kernels, self.layers) if DecodeStack.supports(self.layers) else None

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        meta,  # the attention backend's metadata for this step
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        sample_rows: torch.Tensor,  # rows whose next-token logits are wanted
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos = self.cos_table[positions].to(x.dtype)
        sin = self.signed_sin_table[positions].to(x.dtype)
        # The CPU backend's decode rows come first; each is computed as a plain decode of its position.
        decode_rows = meta.num_decodes if isinstance(meta, AttentionMetadata) else 0
        if self.decode_stack is not None and self.decode_stack.runs(meta, x.shape[0]):
            x, residual = self.decode_stack(x, cos, sin, meta, kv_caches)  # the same numbers, one call
        else:
            residual = None
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, cos, sin, meta, k_cache, v_cache, decode_rows)
        # Only sampled rows need the vocabulary projection: a prefill chunk needs one row, not all. Every
        # decode row is sampled, and they lead sample_rows.
        x, residual = x.index_select(0, sample_rows), residual.index_select(0, sample_rows)
        return self.lm_head(self.ops.add_rms_norm_(x, residual, self.norm.weight, self.norm.eps), decode_rows).float()
