"""Server fixtures: the tiny chat model directory and live servers on loopback (helpers in serverkit.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from serverkit import LiveServer, save_chat_model
from sloserve.server.admission import AdmissionLimits


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture
def start_server():
    """Factory: start_server(model_dir, **settings) -> LiveServer, stopped after the test."""
    servers: list[LiveServer] = []

    def start(model_dir: Path, **kwargs) -> LiveServer:
        servers.append(LiveServer(model_dir, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(chat_model_dir):
    """One shared server for tests that only need a healthy default."""
    s = LiveServer(chat_model_dir, max_body_bytes=64 * 1024, max_tokens_cap=200,
                   admission=AdmissionLimits(max_waiting_requests=256, max_waiting_tokens=1 << 20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of two CPUs per test module (a module's replicas may hold its CPUs for the whole module)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()
