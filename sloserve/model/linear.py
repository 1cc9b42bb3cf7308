"""Linear layers: sloserve's weight-streaming kernel for decode rows and small batches, oneDNN/MKL for the rest."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sloserve.model.quantization import dequantize_int8, quantize_int8
from sloserve.model.skinny import MAX_ROWS, SkinnyMatmul


class Linear(nn.Module):
    """y = x W^T + b. The weight is held once, in PyTorch's [out, in] layout, which both the kernel and
    oneDNN read; with int8 quantization it is the int8 copy plus one float32 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scales: torch.Tensor | None = None  # int8 weights only
        self.skinny: SkinnyMatmul | None = None  # None: always F.linear (no kernels, or not on the CPU)

    def prepare(self, kernels, isa: str, quantization: str | None) -> None:
        """Once the weights are final (loaded, cast): quantize them if asked, and pick the kernel."""
        if quantization == "int8":
            q, self.scales = quantize_int8(self.weight)
            # A new parameter, not an in-place change: a tied lm_head must leave the embedding alone.
            self.weight = nn.Parameter(q, requires_grad=False)
        elif quantization is not None:
            raise ValueError(f"unknown quantization {quantization!r}")
        if kernels is not None and self.weight.device.type == "cpu":
            self.skinny = SkinnyMatmul(kernels, isa, MAX_ROWS[self.weight.dtype])

    def forward(self, x: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        """decode_rows: how many of x's first rows are decode positions. Those always take the kernel, whose
        rows do not depend on one another (oneDNN rounds differently, and by batch size), so a position's
        numbers never depend on what else its step holds; the rest go to oneDNN once they are too many."""
        skinny = self.skinny
        if skinny is not None and x.shape[0] - decode_rows <= skinny.max_rows:
            return skinny(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.scales, self.bias)
        if skinny is not None and decode_rows:
            return torch.cat((self.forward(x[:decode_rows], decode_rows), self.forward(x[decode_rows:])))
        if self.scales is not None:  # prefill-sized: widen this layer's int8 weight for oneDNN, then drop it
            return F.linear(x, dequantize_int8(self.weight, self.scales, x.dtype), self.bias)
        return F.linear(x, self.weight, self.bias)
