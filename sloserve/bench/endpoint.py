"""A local OpenAI endpoint's readiness, for whatever starts one to measure it (the demo, benchmarks)."""
from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base_url: str, server: subprocess.Popen | None = None, timeout_s: float = 300) -> None:
    """Return once GET /health answers 200; raise if `server` (its process) exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")


def stop_servers(servers) -> None:
    """Terminate every server process, then wait for each (they shut down side by side, not in turn)."""
    servers = list(servers)
    for server in servers:
        server.terminate()
    for server in servers:
        server.wait(timeout=60)
