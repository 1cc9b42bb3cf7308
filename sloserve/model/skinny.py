"""The decode-sized matmul (csrc/skinny_matmul.cpp): which instruction set runs it, and for how many rows."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sloserve.model.kernels import cpu_flags

# Bodies of the kernel, slowest first, with the CPU flags each needs; the code is the kernel's.
ISAS: dict[str, tuple[int, frozenset[str]]] = {
    "portable": (0, frozenset()),
    "avx2": (1, frozenset({"avx2", "fma"})),
    "avx512": (2, frozenset({"avx512f", "avx512bw", "avx512vl"})),
    # bfloat16 dot products, and VNNI byte dot products for int8 weights (every such CPU has both)
    "avx512_bf16": (3, frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"})),
}
# Forces a slower body (CI runs the fallbacks on a CPU that has them all): portable | avx2 | avx512.
ISA_ENV = "SLOSERVE_CPU_ISA"

# Up to how many rows of x the kernel runs a matmul of prompt rows; larger batches go to oneDNN/MKL
# (F.linear). Decode rows always take the kernel, whatever their number (Linear.forward): its rows do not
# depend on one another, so a position decoded alone, among others or in a speculative verification gets
# the same bits; oneDNN rounds differently, and a near-tie in bfloat16 would flip a greedy token.
# Measured with benchmarks/skinny_crossover.py on SmolLM2-135M's shapes (AMD EPYC, AVX512-BF16, a
# shared machine: fastest of 5-7 interleaved reps): float32 won at every row count up to 128 (MKL
# takes no fast path on AMD); int8 won up to 128 (widening the int8 weight for oneDNN pays off only at
# prefill sizes); bfloat16 (6-row x tiles; --threads 1 --cpu-time, as the machine was loaded) won
# 2.1-2.3x up to 8 rows, 1.5-1.76x at 16, 1.15x at 32, 1.10x at 40, 0.93-1.06x at 48, 0.99x at 64 and
# lost beyond (0.92x at 96, 0.86x at 160: oneDNN's packed-weight AVX512-BF16 GEMM does more
# multiply-adds per load there).
MAX_ROWS = {torch.float32: 128, torch.bfloat16: 40, torch.int8: 128}


def best_isa(flags: frozenset[str]) -> str:
    return max((name for name, (_, needs) in ISAS.items() if needs <= flags), key=lambda name: ISAS[name][0])


def select_isa(flags: frozenset[str] | None = None, forced: str | None = None) -> str:
    """The fastest body this CPU runs, or the one $SLOSERVE_CPU_ISA forces (refused if the CPU lacks it)."""
    flags = cpu_flags() if flags is None else flags
    forced = forced if forced is not None else os.environ.get(ISA_ENV) or None
    if forced is None:
        return best_isa(flags)
    if forced not in ISAS:
        raise ValueError(f"{ISA_ENV}={forced!r}: choose from {', '.join(ISAS)}")
    if not ISAS[forced][1] <= flags:
        raise ValueError(f"{ISA_ENV}={forced!r}: this CPU lacks {', '.join(sorted(ISAS[forced][1] - flags))}")
    return forced


@dataclass(slots=True)
class SkinnyMatmul:
    """y = x W^T (+ b) by the compiled kernel, for decode rows and for at most `max_rows` prompt rows."""

    kernels: object  # the compiled extension module
    isa: str
    max_rows: int

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernels.skinny_matmul(x, weight, scales, bias, ISAS[self.isa][0])
