"""Graceful shutdown: SIGTERM stops admitting (503), lets in-flight requests end, and exits 0."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from serverkit import metric, parse_metrics, wait_until

STREAM = {"prompt": "Shall I compare thee", "max_tokens": 200, "ignore_eos": True, "stream": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, results: list, first_chunk: threading.Event) -> None:
    """Read one streamed completion to the end; record its finish reason (or error code) and whether [DONE] came."""
    finish, done = None, False
    with httpx.stream("POST", url + "/v1/completions", json=STREAM, timeout=60) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                first_chunk.set()
                event = json.loads(line[6:])
                if "error" in event:
                    finish = "error:" + event["error"]["code"]
                    continue
                choices = event["choices"]
                finish = (choices[0]["finish_reason"] if choices else None) or finish
    results.append((finish, done))


def test_sigterm_drains_in_flight_requests_and_exits_0(chat_model_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # One sequence at a time: three 200-token requests keep the server busy for a while after the signal.
    proc = subprocess.Popen(
        [sys.executable, "-m", "sloserve.cli", "serve", str(chat_model_dir), "--load-format", "dummy",
         "--port", str(port), "--max-num-seqs", "1", "--num-kv-blocks", "64", "--log-level", "warning",
         "--shutdown-grace-period", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert wait_until(lambda: _healthy(url) or proc.poll() is not None, timeout=60, interval=0.2)
        assert proc.poll() is None, proc.stdout.read()
        results: list = []
        started = threading.Event()  # whichever request runs first
        threads = [threading.Thread(target=_stream, args=(url, results, started)) for _ in range(3)]
        for t in threads:
            t.start()
        assert started.wait(30)
        assert wait_until(lambda: _admitted(_metrics(url)) == 3)  # all admitted before the signal
        proc.send_signal(signal.SIGTERM)
        # Draining: still listening, but new work is refused with 503 and /health says so.
        assert wait_until(lambda: httpx.get(url + "/health").status_code == 503, timeout=5)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        assert results == [("length", True)] * 3
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_grace_period_over_aborts_what_is_left(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.02, engine_kwargs={"max_num_seqs": 1})
    results: list = []
    started = threading.Event()  # whichever request runs first
    threads = [threading.Thread(target=_stream, args=(server.url, results, started)) for _ in range(2)]
    for t in threads:
        t.start()
    assert started.wait(30)
    assert wait_until(lambda: _admitted(server.metrics()) == 2)  # both admitted before draining
    t0 = time.monotonic()
    server.call(server.ctx.drain(grace_s=0.3))
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(30)
    # Both streams end with an error event, never a finish_reason that looks complete; nothing holds a KV block.
    assert sorted(results) == [("error:request_aborted", True)] * 2
    m = server.metrics()
    assert metric(m, "sloserve:kv_cache_used_blocks") == 0
    assert metric(m, "sloserve:request_success_total", finished_reason="abort") == 2


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _admitted(samples: dict[str, float]) -> float:
    """Requests in flight or already ended."""
    return sum(metric(samples, name) for name in (
        "sloserve:num_requests_running", "sloserve:num_requests_waiting", "sloserve:request_success_total"))


def _metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics").text)
