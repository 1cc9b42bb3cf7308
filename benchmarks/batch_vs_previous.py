"""decode_vs_peers.py's batch and single-request decode runs, this checkout against an earlier version of itself
(a git ref), each in its own process, interleaved run by run: generated tok/s and CPU time per generated token."""

# Run: python benchmarks/batch_vs_previous.py [--ref main] [--dtype bfloat16] [--rounds 5] [--threads 2] [--quick]
#      [--layers]  (also this checkout with the fused decode stack off: decode_vs_peers.py's sloserve_layers)
# The earlier version is exported with `git archive` (as vs_previous.py does) and imported from there
# (PYTHONPATH), with this checkout's Python environment; both processes load the model once and then wait,
# idle, for their turn, so each run has the machine to itself but for other users. CPU time (all threads of
# the process) moves far less than wall time when others take the cores. Ratios are current / previous,
# per round, then their median (higher is better for tok/s, lower for CPU ms).

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RUNS = ("batch", "decode")


def worker(args) -> None:
    """Builds one system, then answers each line on stdin (a run's name) with one JSON line of results."""
    import decode_vs_peers as dvp
    import sloserve

    workload = dvp.make_workload(args.quick)
    with tempfile.TemporaryDirectory() as workdir:
        system = dvp.build_system("sloserve" if args.fused else "sloserve_layers", args.dtype, args, workload, workdir)
        dvp.warm_up(system, workload)
        print(json.dumps({"ready": sloserve.__file__}), flush=True)
        for line in sys.stdin:
            cpu0 = sum(os.times()[:2])
            if line.strip() == "batch":
                rate = system.batch_tokens_per_s(workload.batch_prompts, workload.batch_outputs)["generated_tok_s"]
                tokens = sum(workload.batch_outputs)
            else:
                rate, tokens = system.decode_tokens_per_s(workload.decode_prompt, workload.decode_new), workload.decode_new
            cpu_ms = (sum(os.times()[:2]) - cpu0) * 1e3 / tokens  # the prompts' prefill included
            print(json.dumps({"tok_s": rate, "cpu_ms": cpu_ms}), flush=True)


def start(source: Path, fused: bool, args) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(source), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", "--dtype", args.dtype, "--threads", str(args.threads)]
    cmd += ["--quick"] * args.quick + ["--no-fused"] * (not fused)
    proc = subprocess.Popen(cmd, env=env, cwd=source, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    where = json.loads(proc.stdout.readline())["ready"]
    if not where.startswith(str(source)):
        raise SystemExit(f"PYTHONPATH={source} still imports sloserve from {where}")
    return proc


def ask(proc: subprocess.Popen, run: str) -> dict:
    proc.stdin.write(run + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ref", default="main")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="decode_vs_peers.py's short workload")
    ap.add_argument("--layers", action="store_true", help="also this checkout with the fused decode stack off")
    ap.add_argument("--sloserve-batched-tokens", type=int, default=2048)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-fused", dest="fused", action="store_false", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from vs_previous import REPO, export

    with tempfile.TemporaryDirectory() as previous:
        sha = export(args.ref, Path(previous))
        systems = {"previous": start(Path(previous), True, args), "current": start(REPO, True, args)}
        if args.layers:
            systems["current_layers"] = start(REPO, False, args)
        results = {name: {run: [] for run in RUNS} for name in systems}
        for rnd in range(args.rounds):
            for run in RUNS:
                order = list(systems) if rnd % 2 == 0 else list(reversed(systems))  # who goes first alternates
                for name in order:
                    results[name][run].append(ask(systems[name], run))
                print(f"round {rnd + 1} {run}: " + ", ".join(
                    f"{name} {results[name][run][-1]['tok_s']:.1f} tok/s {results[name][run][-1]['cpu_ms']:.2f} cpu ms"
                    for name in systems), file=sys.stderr, flush=True)
        for proc in systems.values():
            proc.stdin.close()
            proc.wait()
    print(f"{args.dtype}, {args.threads} threads, {args.rounds} rounds, previous = {args.ref} ({sha[:8]}), "
          f"load avg {os.getloadavg()[0]:.1f}")
    for run in RUNS:
        for name in systems:
            rates = [r["tok_s"] for r in results[name][run]]
            cpu = [r["cpu_ms"] for r in results[name][run]]
            line = (f"{run:6s} {name:15s} tok/s min {min(rates):7.1f} median {statistics.median(rates):7.1f}   "
                    f"cpu ms/tok min {min(cpu):6.2f} median {statistics.median(cpu):6.2f}")
            if name != "previous":
                base = results["previous"][run]
                rate_ratio = statistics.median(r["tok_s"] / b["tok_s"] for r, b in zip(results[name][run], base))
                cpu_ratio = statistics.median(r["cpu_ms"] / b["cpu_ms"] for r, b in zip(results[name][run], base))
                line += f"   vs previous: tok/s x{rate_ratio:.3f}, cpu x{cpu_ratio:.3f}"
            print(line)


if __name__ == "__main__":
    main()
