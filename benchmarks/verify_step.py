"""One speculative verification step, its k + 1 rows per request computed as decode rows (the fused decode stack,
decode attention, the batch-invariant matmul) vs as a prompt span (the path verifications took before: op by op,
SDPA over the gathered context, oneDNN past the kernel's row limit), on the same inputs, interleaved."""

# Run: python benchmarks/verify_step.py [--requests 1,8,32] [--rows 5] [--context 300] [--threads 2] [--reps 10]
# SmolLM2-135M's shape in bfloat16 (random weights), each request's context drawn from [context/2, 3 context/2).
# Each sample is 3 steps; wall and process CPU time (all threads) per step, min and median over reps; the ratio is
# span / decode rows per pair of samples, their median (above 1: decode rows are faster).

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_vs_peers as dvp  # noqa: E402  (sibling module: the model shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", default="1,8,32")
    ap.add_argument("--rows", type=int, default=5, help="rows per verification: k drafts + 1")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    from transformers import LlamaConfig

    from sloserve.config import EngineConfig
    from sloserve.model.attention import SequenceRows
    from sloserve.model.loader import load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as config_dir:
        LlamaConfig(**dvp.MODEL).save_pretrained(config_dir)
        config = EngineConfig(model=config_dir, load_format="dummy", dtype="bfloat16", device="cpu",
                              skip_tokenizer_init=True)
        model = load_model(config).model
    s, bs, k1 = model.shape, config.block_size, args.rows
    print(f"bfloat16, {args.threads} threads, {args.rows} rows per verification, load avg {os.getloadavg()[0]:.1f}")
    for n in map(int, args.requests.split(",")):
        g = torch.Generator().manual_seed(n)
        contexts = torch.randint(args.context // 2, args.context * 3 // 2, (n,), generator=g).tolist()
        tables, used = [], 0
        for c in contexts:
            blocks = -(-(c + k1) // bs)
            tables.append(list(range(used, used + blocks)))
            used += blocks
        caches = [tuple(torch.randn(used * bs, s.num_kv_heads, s.head_dim, generator=g).bfloat16() for _ in "kv")
                  for _ in range(s.num_layers)]
        positions = torch.tensor([p for c in contexts for p in range(c, c + k1)])
        slots = torch.tensor([t[p // bs] * bs + p % bs for c, t in zip(contexts, tables) for p in range(c, c + k1)])
        ids = torch.randint(2, s.vocab_size, (len(positions),), generator=g)
        metas = {verifies: model.attention.prepare([SequenceRows(c, k1, t, as_decodes=verifies)
                                                    for c, t in zip(contexts, tables)], slots)
                 for verifies in (True, False)}

        def step(verifies: bool) -> None:
            with torch.inference_mode():
                model(ids, positions, metas[verifies], caches, torch.arange(len(positions)))

        for verifies in (True, False):
            step(verifies)
        samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for rep in range(args.reps):
            for verifies in ((True, False) if rep % 2 == 0 else (False, True)):  # who goes first alternates
                cpu0, wall0 = sum(os.times()[:2]), time.perf_counter()
                for _ in range(3):
                    step(verifies)
                samples[verifies].append(((time.perf_counter() - wall0) / 3e-3, (sum(os.times()[:2]) - cpu0) / 3e-3))
        for verifies, name in ((True, "decode rows"), (False, "prompt span")):
            wall, cpu = [w for w, _ in samples[verifies]], [c for _, c in samples[verifies]]
            print(f"{n:3d} requests x {k1} rows  {name:11s}  wall ms min {min(wall):7.2f} median {statistics.median(wall):7.2f}"
                  f"   cpu ms min {min(cpu):7.2f} median {statistics.median(cpu):7.2f}")
        ratio = statistics.median(span[0] / rows[0] for span, rows in zip(samples[False], samples[True]))
        print(f"{n:3d} requests: prompt span / decode rows, wall: x{ratio:.3f}")


if __name__ == "__main__":
    main()
