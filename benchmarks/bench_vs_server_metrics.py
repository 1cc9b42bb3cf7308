"""Do clients see what the server reports? `sloserve bench` (and GuideLLM) TTFT/ITL vs the server's vLLM histograms.

Serves the bundled demo model (`sloserve serve --metrics-compat vllm`, through this interpreter) and loads it
with `sloserve bench`, then, given `--guidellm PATH` (its executable; GuideLLM is not a dependency of the
project, see benchmarks/guidellm_check.sh), with GuideLLM at the same rate and lengths. For each client it
compares the client's mean TTFT and ITL with the means of `vllm:time_to_first_token_seconds` and
`vllm:inter_token_latency_seconds` over the same requests (the histograms are read before and after each
client's run). Means are pooled: TTFT over requests, ITL over every gap. The clients' numbers include
HTTP and SSE on loopback, so they sit slightly above the engine's.

    python benchmarks/bench_vs_server_metrics.py [--num-prompts 40] [--request-rate 4] [--input-len 64] [--guidellm PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sloserve.bench.endpoint import free_port, wait_until_healthy
from sloserve.bench.metrics import summarize
from sloserve.bench.results import BenchResults

DEMO_MODEL = Path(__file__).resolve().parent.parent / "sloserve" / "assets" / "demo-target"
SLOSERVE = [sys.executable, "-m", "sloserve.cli"]  # the project's command, without relying on PATH
SERIES = {"TTFT": "vllm:time_to_first_token_seconds", "ITL": "vllm:inter_token_latency_seconds"}


def server_totals(base: str) -> dict[str, tuple[float, float]]:
    """Histogram name -> (sum, count), summed over labels."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in SERIES.values():
            total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
            count = sum(s.value for s in family.samples if s.name.endswith("_count"))
            out[family.name] = (total, count)
    return out


def run_sloserve_bench(base: str, args, out: Path) -> dict[str, float]:
    subprocess.run([*SLOSERVE, "bench", "--base-url", base, "--num-prompts", str(args.num_prompts),
                    "--request-rate", str(args.request_rate), "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len), "--ignore-eos", "--tokenizer", str(DEMO_MODEL),
                    "--result-dir", str(out), "--no-plots", "--disable-tqdm"], check=True, stdout=subprocess.DEVNULL)
    run = BenchResults.load(str(out / "results.json")).runs[0]
    summary = summarize(run.records, run.duration_s)
    return {"TTFT": summary.ttft.mean, "ITL": summary.itl.mean}


def run_guidellm(base: str, args, out: Path) -> dict[str, float]:
    path = out / "guidellm.json"
    subprocess.run([args.guidellm, "run", f"--backend=kind=openai_http,target={base}",
                    f"--profile=kind=poisson,rate={args.request_rate}", f"--constraint=kind=max_requests,count={args.num_prompts}",
                    f"--data=kind=synthetic_text,prompt_tokens={args.input_len},output_tokens={args.output_len}",
                    f"--tokenizer=kind=huggingface_auto,model={DEMO_MODEL}", f"--output=kind=json,path={path}",
                    "--disable-console"], check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads(path.read_text())["benchmarks"][0]["metrics"]
    return {"TTFT": metrics["time_to_first_token_ms"]["successful"]["mean"] / 1e3,
            "ITL": metrics["inter_token_latency_ms"]["successful"]["mean"] / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request")
    parser.add_argument("--guidellm", help="path of a `guidellm` executable (0.8 or later) to compare as well")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    clients = {"sloserve bench": run_sloserve_bench} | ({"guidellm": run_guidellm} if args.guidellm else {})
    rows = []
    server = subprocess.Popen([*SLOSERVE, "serve", "--port", str(port), "--metrics-compat", "vllm", "--log-level", "warning"])
    try:
        wait_until_healthy(base, server)
        for name, run in clients.items():
            before = server_totals(base)
            seen = run(base, args, Path(tempfile.mkdtemp(prefix="bench-vs-server-")))
            after = server_totals(base)
            for label, series in SERIES.items():
                (s0, c0), (s1, c1) = before.get(series, (0.0, 0.0)), after[series]
                rows.append((name, label, seen[label], (s1 - s0) / (c1 - c0)))
    finally:
        server.terminate()
        server.wait(60)
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()}; {args.num_prompts} requests per client at "
          f"{args.request_rate:g} req/s (Poisson), {args.input_len} prompt / {args.output_len} output tokens, bundled demo model")
    print(f"{'client':>15} {'metric':>6} {'client mean ms':>15} {'server mean ms':>15} {'client/server':>14}")
    for name, label, mine, theirs in rows:
        print(f"{name:>15} {label:>6} {mine * 1e3:15.2f} {theirs * 1e3:15.2f} {mine / theirs:14.3f}")
    by_client = {(name, label): mine for name, label, mine, _ in rows}
    if args.guidellm:
        for label in SERIES:
            ratio = by_client[("guidellm", label)] / by_client[("sloserve bench", label)]
            print(f"guidellm / sloserve bench, {label} mean: {ratio:.3f}")


if __name__ == "__main__":
    main()
