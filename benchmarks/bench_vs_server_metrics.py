"""Does the client see what the server reports? `sloserve bench` TTFT/ITL vs the server's own vLLM histograms.

Serves the bundled demo model (`sloserve serve --metrics-compat vllm`, through this interpreter), loads it
with `sloserve bench`, then compares the client's mean TTFT and ITL with the means of
`vllm:time_to_first_token_seconds` and `vllm:inter_token_latency_seconds` from /metrics. The client's
numbers include HTTP and SSE on loopback, so they sit slightly above the engine's.

    python benchmarks/bench_vs_server_metrics.py [--num-prompts 40] [--request-rate 4]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sloserve.bench.metrics import summarize
from sloserve.bench.results import BenchResults

DEMO_MODEL = Path(__file__).resolve().parent.parent / "sloserve" / "assets" / "demo-target"
SLOSERVE = [sys.executable, "-m", "sloserve.cli"]  # the project's command, without relying on PATH


def server_means(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
            total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
            count = sum(s.value for s in family.samples if s.name.endswith("_count"))
            out[family.name] = total / count if count else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--request-rate", type=float, default=4.0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*SLOSERVE, "serve", "--port", str(port), "--metrics-compat", "vllm", "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.5)
        out = Path(tempfile.mkdtemp(prefix="bench-vs-server-"))
        subprocess.run([*SLOSERVE, "bench", "--base-url", base, "--num-prompts", str(args.num_prompts),
                        "--request-rate", str(args.request_rate), "--random-input-len", "64", "--random-output-len", "32",
                        "--ignore-eos", "--tokenizer", str(DEMO_MODEL), "--result-dir", str(out), "--no-plots", "--disable-tqdm"],
                       check=True, stdout=subprocess.DEVNULL)
        server_side = server_means(base)
    finally:
        server.terminate()
        server.wait(60)
    run = BenchResults.load(str(out / "results.json")).runs[0]
    client = summarize(run.records, run.duration_s)
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()}; {args.num_prompts} requests at "
          f"{args.request_rate:g} req/s, 64 prompt / 32 output tokens, bundled demo model")
    print(f"{'metric':>6} {'client mean ms':>15} {'server mean ms':>15} {'client/server':>14}")
    for label, mine, name in (("TTFT", client.ttft.mean, "vllm:time_to_first_token_seconds"),
                              ("ITL", client.itl.mean, "vllm:inter_token_latency_seconds")):
        theirs = server_side[name]
        print(f"{label:>6} {mine * 1e3:15.2f} {theirs * 1e3:15.2f} {mine / theirs:14.3f}")


if __name__ == "__main__":
    main()
