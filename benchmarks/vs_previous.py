"""This checkout's server against an earlier version of itself (a git ref): same model, same knobs, same load,
interleaved round by round; request throughput, TTFT and TPOT under `sloserve bench`, and their ratio."""

# Run: python benchmarks/vs_previous.py [--ref HEAD~1] [--rounds 3] [--num-prompts 100] [--rates inf,40]
#      [--output-len 32] [--threads 1]
# The earlier version is exported with `git archive` into a temporary folder and served from there
# (PYTHONPATH), with this checkout's Python environment and the bundled demo model of this checkout, so only
# the engine and server code differ. Each round plays every rate to both servers, alternating which goes
# first, so load from others on a shared machine falls on both alike. Figures are medians over rounds;
# ratios are current / previous per round, and their median (throughput: higher is better; latencies: lower).

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sloserve.bench.endpoint import free_port, stop_servers, wait_until_healthy
from sloserve.bench.metrics import summarize
from sloserve.bench.results import BenchResults
from sloserve.cli_args import default_model_dir
from sloserve.sim.profile import describe_machine

REPO = Path(__file__).resolve().parent.parent
KNOBS = ["--max-num-batched-tokens", "256", "--max-num-seqs", "32"]
METRICS = (("req/s", "higher"), ("out tok/s", "higher"), ("TTFT p50 ms", "lower"), ("TTFT p99 ms", "lower"),
           ("TPOT p50 ms", "lower"), ("TPOT p99 ms", "lower"))


def export(ref: str, into: Path) -> str:
    """Write the tree of `ref` into `into`; returns its commit id."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha


def serve(source: Path, port: int, threads: int) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(source), "OMP_NUM_THREADS": str(threads)}
    # `python -m` puts the working folder first on sys.path, so each server runs from its own source folder.
    where = subprocess.run([sys.executable, "-c", "import sloserve; print(sloserve.__file__)"], env=env, cwd=source,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(source)):
        raise SystemExit(f"PYTHONPATH={source} still imports sloserve from {where}")
    server = subprocess.Popen([sys.executable, "-m", "sloserve.cli", "serve", str(default_model_dir()), *KNOBS,
                               "--port", str(port), "--log-level", "warning"], env=env, cwd=source)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout_s=900)  # the earlier kernels may build
    except BaseException:
        server.kill()
        raise
    return server


def bench(port: int, rate: str, args, seed: int, result_dir: Path) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "sloserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
                    "--model", default_model_dir().name, "--dataset-name", "sharegpt",
                    "--num-prompts", str(args.num_prompts), "--sharegpt-output-len", str(args.output_len),
                    "--request-rate", rate, "--ignore-eos", "--temperature", "0", "--seed", str(seed),
                    "--no-plots", "--result-dir", str(result_dir)], check=True, stdout=subprocess.DEVNULL)
    run = BenchResults.load(str(result_dir / "results.json")).runs[0]
    s = summarize(run.records, run.duration_s, (50.0, 99.0))
    if s.failed:
        raise RuntimeError(f"{s.failed} requests failed in {result_dir}")
    return {"req/s": s.request_throughput, "out tok/s": s.output_throughput,
            "TTFT p50 ms": s.ttft.percentiles[50.0] * 1e3, "TTFT p99 ms": s.ttft.percentiles[99.0] * 1e3,
            "TPOT p50 ms": s.tpot.percentiles[50.0] * 1e3, "TPOT p99 ms": s.tpot.percentiles[99.0] * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ref", default="HEAD~1", help="the earlier version: any git ref")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--rates", default="inf,40", help="request rates (req/s; inf: all at once)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both servers")
    args = p.parse_args()
    rates = args.rates.split(",")
    with tempfile.TemporaryDirectory(prefix="sloserve-previous-") as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        sha = export(args.ref, tmp / "src")
        sources = {"previous": tmp / "src", "current": REPO}
        ports = {name: free_port() for name in sources}
        servers = {}
        try:
            for name, source in sources.items():
                servers[name] = serve(source, ports[name], args.threads)
            figures: dict[tuple[str, str], list[dict]] = {}
            for r in range(args.rounds):
                order = list(sources) if r % 2 == 0 else list(reversed(sources))
                for rate in rates:
                    for name in order:
                        out = tmp / f"{name}-{rate}-{r}"
                        f = bench(ports[name], rate, args, r, out)
                        figures.setdefault((name, rate), []).append(f)
                        print(f"  round {r + 1} rate {rate} {name:>8}: " + ", ".join(f"{k} {v:.1f}" for k, v in f.items()),
                              flush=True)
                print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            stop_servers(servers.values())
    print(f"\nmachine: {describe_machine()['cpu']}, {os.cpu_count()} cores, load average {os.getloadavg()}")
    print(f"previous = {args.ref} ({sha[:10]}); current = this checkout's working tree; demo model, "
          f"{' '.join(KNOBS)}, OMP_NUM_THREADS={args.threads}; ShareGPT prompts, {args.output_len} output tokens "
          f"(ignore_eos), {args.num_prompts} requests per run; medians of {args.rounds} rounds")
    # Ratios are paired by round (both systems within the same minutes), then summarised: a machine that drifts
    # between rounds moves both sides of a pair, not one side of a median.
    print(f"{'rate':>6} {'metric':>12} {'previous':>10} {'current':>10} {'current/previous by round':>26} {'median':>7}")
    for rate in rates:
        for metric, better in METRICS:
            pairs = list(zip(figures[("previous", rate)], figures[("current", rate)]))
            ratios = [c[metric] / p[metric] for p, c in pairs]
            before = statistics.median(p[metric] for p, _ in pairs)
            after = statistics.median(c[metric] for _, c in pairs)
            print(f"{rate:>6} {metric:>12} {before:10.1f} {after:10.1f} {' '.join(f'{r:.2f}' for r in ratios):>26} "
                  f"{statistics.median(ratios):6.2f}x ({better} is better)")


if __name__ == "__main__":
    main()
