"""What batch-invariant mode (VLLM_BATCH_INVARIANT=1) costs: decode_vs_peers.py's prefill, single-request decode
and 32-request batch, the default path vs the same engine with every position computed as a decode, in one
process, run by run interleaved; wall time and process CPU time (the latter moves less when others take cores)."""

# Run: python benchmarks/batch_invariant.py [--dtype bfloat16] [--rounds 3] [--threads 2] [--quick]
# SmolLM2-135M's shape with random weights (decode_vs_peers.py's MODEL and workload). Ratios are invariant / default
# per round (time: higher is dearer), then their median, min and max.

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_vs_peers as dvp  # noqa: E402  (sibling module; benchmarks/ is not a package)

RUNS = {  # name -> (what is timed, its unit)
    "prefill": "prefill 512 s",
    "decode": "decode 128+64 s",
    "batch": "batch 32 req s",
}


def timed(peer, run: str, w: dvp.Workload) -> tuple[float, float]:
    cpu0, t0 = sum(os.times()[:2]), time.perf_counter()
    if run == "prefill":
        peer.prefill_seconds(w.prefill_prompt)
    elif run == "decode":
        peer.decode_tokens_per_s(w.decode_prompt, w.decode_new)
    else:
        peer.batch_tokens_per_s(w.batch_prompts, w.batch_outputs)
    return time.perf_counter() - t0, sum(os.times()[:2]) - cpu0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="decode_vs_peers.py's quick workload")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig

    torch.set_num_threads(args.threads)
    w = dvp.make_workload(args.quick)
    config_dir = tempfile.mkdtemp(prefix="batch-invariant-")
    LlamaConfig(**dvp.MODEL).save_pretrained(config_dir)
    peers = {name: dvp.SloservePeer(config_dir, args.dtype, None, w, 2048) for name in ("default", "invariant")}
    peers["invariant"].llm.engine.executor.batch_invariant = True
    for peer in peers.values():
        dvp.warm_up(peer, w)
    print(f"{dvp._cpu_model()}, {args.threads} threads, {args.dtype}; {w.describe()}; load {os.getloadavg()[0]:.1f}")
    ratios: dict[str, list[tuple[float, float]]] = {run: [] for run in RUNS}
    for rnd in range(args.rounds):
        for run in RUNS:
            order = ("default", "invariant") if rnd % 2 == 0 else ("invariant", "default")
            got = {name: timed(peers[name], run, w) for name in order}
            ratios[run].append((got["invariant"][0] / got["default"][0], got["invariant"][1] / got["default"][1]))
            print(f"round {rnd} {RUNS[run]:>16}: default {got['default'][0]:.3f} s (CPU {got['default'][1]:.3f}), "
                  f"invariant {got['invariant'][0]:.3f} s (CPU {got['invariant'][1]:.3f}); load {os.getloadavg()[0]:.1f}",
                  flush=True)
    print("\ninvariant / default, median (min..max) over rounds:")
    for run, rs in ratios.items():
        wall, cpu = [r[0] for r in rs], [r[1] for r in rs]
        print(f"  {RUNS[run]:>16}: wall x{statistics.median(wall):.2f} ({min(wall):.2f}..{max(wall):.2f}), "
              f"CPU x{statistics.median(cpu):.2f} ({min(cpu):.2f}..{max(cpu):.2f})")


if __name__ == "__main__":
    main()
