"""A decode step's decoder layers as one call into the C++ kernels (csrc/decode_stack.cpp).

Run layer by layer, op by op, a decode token of a small model spends about as long in Python, the
dispatcher and ~300 OpenMP fork/joins as in streaming its weights. The fused stack runs the same
kernel bodies in one parallel region and returns exactly the same numbers, so it takes every step
whose rows are all decode rows, which the kernels would take op by op anyway: decodes and speculative
verifications, however many (no prompt chunk, which needs prefill attention and oneDNN's matmul).
"""
from __future__ import annotations

import torch

from sloserve.model.attention.cpu import AttentionMetadata
from sloserve.model.skinny import ISAS


class DecodeStack:
    def __init__(self, kernels, layers) -> None:
        self.kernels, self.layers = kernels, layers
        self._stack = None  # built at the first decode step: see _built

    @staticmethod
    def supports(layers) -> bool:
        """Whether every projection runs on the skinny kernel (the CPU, with the kernels built)."""
        return all(p.skinny is not None for layer in layers for p in _projections(layer))

    def runs(self, meta, tokens: int) -> bool:
        return isinstance(meta, AttentionMetadata) and 0 < meta.num_decodes == tokens and not meta.prefills

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the step's embeddings, which become the residual stream in place. Returns the last layer's
        output (not yet added to the residual) and the residual, as the layers do one by one."""
        first = self.layers[0]
        return self._built().forward(x, cos, signed_sin, kv_caches, meta.slot_mapping, meta.block_tables,
                                     meta.context_lens, meta.block_size, first.scale)

    def _built(self):
        # Built on first use, not at prepare time: the loader moves the final weights into huge pages
        # after preparing them, and the C++ stack holds the tensors it was given.
        if self._stack is None:
            first = self.layers[0]
            self._stack = self.kernels.DecodeStack(
                [_weights(layer) for layer in self.layers], first.num_heads, first.num_kv_heads, first.head_dim,
                first.input_layernorm.eps, ISAS[first.qkv_proj.skinny.isa][0])
        return self._stack


def _projections(layer):
    return layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj


def _weights(layer) -> dict[str, torch.Tensor | None]:
    weights = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
               "q_norm": layer.q_norm.weight if layer.q_norm is not None else None,
               "k_norm": layer.k_norm.weight if layer.k_norm is not None else None}
    for name, proj in zip(("qkv", "o_proj", "gate_up", "down"), _projections(layer)):
        weights |= {f"{name}.weight": proj.weight, f"{name}.scales": proj.scales, f"{name}.bias": proj.bias}
    return weights
