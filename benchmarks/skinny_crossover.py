"""Up to how many rows sloserve's matmul kernel beats oneDNN/MKL (F.linear): the table behind skinny.MAX_ROWS."""

# Run: python benchmarks/skinny_crossover.py [--threads 2] [--reps 15] [--rows 1,2,4,...] [--dtypes ...]
#      [--cpu-time]  (with --threads 1: this thread's CPU time, which other processes on a shared
#                     machine cannot stretch the way they stretch wall time; compute-bound row counts only)
# Both sides run on the same weights, interleaved call by call (this machine's speed drifts); each cell
# is the fastest (least disturbed: the machine is shared) over reps of the summed time of LAYERS layers' matmuls plus the vocabulary head: more
# weight bytes than any cache holds, so each pass streams them from memory as a decode step does.

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from sloserve.model.kernels import load_kernels
from sloserve.model.quantization import dequantize_int8, quantize_int8
from sloserve.model.skinny import ISAS, select_isa

# SmolLM2-135M: qkv, o, gate|up, down of LAYERS layers, and lm_head ([out, in]).
LAYERS = 8
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * LAYERS + [(32000, 576)]


def one_pass(fn, weights, x_by_k, clock=time.perf_counter) -> float:
    start = clock()
    for w in weights:
        fn(x_by_k[w[0].shape[1]], w)
    return clock() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", default="1,2,4,8,12,16,24,32,48,64,96,128")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--cpu-time", action="store_true", help="time by this thread's CPU time (needs --threads 1)")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    kernels, isa = load_kernels(), select_isa()
    code = ISAS[isa][0]
    gen = torch.Generator().manual_seed(0)
    print(f"isa {isa}, threads {args.threads}, load avg {os.getloadavg()[0]:.1f}; fastest "
          f"{'CPU' if args.cpu_time else 'wall'} ms of {args.reps} interleaved reps (kernel / F.linear), of {LAYERS} layers' matmuls plus the vocabulary head")
    for name in args.dtypes.split(","):
        dtype = torch.bfloat16 if name == "int8" else getattr(torch, name)
        weights = []
        for n, k in SHAPES:
            w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
            weights.append(quantize_int8(w) if name == "int8" else (w, None))
        kernel = lambda x, w: kernels.skinny_matmul(x, w[0], w[1], None, code)  # noqa: E731
        if name == "int8":  # what Linear does above the limit: widen, then oneDNN
            onednn = lambda x, w: F.linear(x, dequantize_int8(w[0], w[1], x.dtype))  # noqa: E731
        else:
            onednn = lambda x, w: F.linear(x, w[0])  # noqa: E731
        last_win = 0
        for rows in map(int, args.rows.split(",")):
            x_by_k = {k: torch.randn(rows, k, generator=gen).to(dtype) for k in {k for _, k in SHAPES}}
            one_pass(kernel, weights, x_by_k), one_pass(onednn, weights, x_by_k)  # warm
            times = {"kernel": [], "onednn": []}
            for _ in range(args.reps):
                times["kernel"].append(one_pass(kernel, weights, x_by_k, clock))
                times["onednn"].append(one_pass(onednn, weights, x_by_k, clock))
            mk, mo = (min(times[s]) * 1e3 for s in ("kernel", "onednn"))
            if mk <= mo and last_win == rows_before(args.rows, rows):
                last_win = rows
            gbs = sum(w[0].numel() * w[0].element_size() for w in weights) / mk / 1e6
            print(f"{name:9s} rows {rows:4d}: {mk:8.2f} / {mo:8.2f} ms  ({mo / mk:.2f}x)  kernel {gbs:5.1f} GB/s")
        print(f"{name:9s} kernel wins up to {last_win} rows (every smaller row count included)")


def rows_before(rows_arg: str, rows: int) -> int:
    values = list(map(int, rows_arg.split(",")))
    i = values.index(rows)
    return values[i - 1] if i else 0


if __name__ == "__main__":
    main()
