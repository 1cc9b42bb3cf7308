"""Weight-only int8 (`--quantization int8`): per-output-channel symmetric scales, one int8 copy of each weight."""
from __future__ import annotations

import torch


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (int8 [N, K], float32 scales [N]) with weight ~= q * scale[:, None].

    Symmetric, one scale per output row (its largest magnitude maps to 127): a dot product then needs
    one multiply at its end, and no zero point. -128 is never used, so the range stays symmetric."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight the int8 one stands for, in `dtype` (for matmuls the kernel does not take)."""
    return (q.float() * scales[:, None]).to(dtype)
