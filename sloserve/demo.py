"""`sloserve demo`: serve the bundled model, show a few completions, then measure it under a short load."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer

from sloserve.bench.endpoint import free_port, wait_until_healthy
from sloserve.cli_args import default_model_dir

SAMPLE_PROMPTS = [
    "Shall I compare thee to a summer's day?",
    "What light through yonder window breaks?",
    "Speak, good friend: what news from the court?",
]


def _show_samples(base_url: str, model: str) -> None:
    typer.secho("\nA few chat completions (temperature 0.8, seeded):", bold=True)
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48,
                "temperature": 0.8, "seed": i}
        start = time.perf_counter()
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60.0).raise_for_status().json()
        seconds = time.perf_counter() - start
        text = reply["choices"][0]["message"]["content"].strip().replace("\n", " / ")
        typer.echo(f"  user: {prompt}\n  model ({reply['usage']['completion_tokens']} tokens, {seconds:.2f} s): {text}\n")


def demo(
    model: str | None = typer.Argument(None, help="model directory (default: the bundled demo model)"),
    num_prompts: int = typer.Option(60, help="requests in the measured load"),
    request_rate: float = typer.Option(8.0, help="Poisson arrival rate of the load, requests/s"),
    slo: str = typer.Option("ttft=200ms,tpot=50ms", help="SLO for attainment and goodput (DESIGN.md's interactive chat)"),
    result_dir: str = typer.Option("demo-results", help="where the bench writes results.json, CSV and plots"),
) -> None:
    """Serve the bundled model, print sample completions, run a short mixed load and report latency."""
    model_dir = Path(model) if model else default_model_dir()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "sloserve.cli"]
    typer.secho(f"Serving {model_dir} on {base_url} ...", bold=True)
    server = subprocess.Popen([*cli, "serve", str(model_dir), "--port", str(port), "--log-level", "warning"])
    try:
        wait_until_healthy(base_url, server, timeout_s=120)
        _show_samples(base_url, model_dir.name)
        typer.secho(f"Load: {num_prompts} ShareGPT-style chats, Poisson arrivals at {request_rate} req/s, SLO {slo}",
                    bold=True)
        subprocess.run([
            *cli, "bench", "--base-url", base_url, "--endpoint", "/v1/chat/completions", "--model", model_dir.name,
            "--dataset-name", "sharegpt", "--tokenizer", str(model_dir), "--sharegpt-output-len", "64",
            "--num-prompts", str(num_prompts), "--request-rate", str(request_rate), "--num-warmups", "2",
            "--slo", slo, "--result-dir", result_dir, "--temperature", "0.8",
        ], check=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
