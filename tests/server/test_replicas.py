"""Two engine replicas on a local Ray behind the router: the API unchanged, /metrics per replica and in total,
a replica killed mid-stream ends its request with an error, nothing hangs, and the replica comes back."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

import ray

from serverkit import MODEL_NAME, LiveServer, metric, parse_metrics, wait_until
from sloserve.router.launch import ReplicaSettings, start_replicas, stop_replicas

GOOD = {"model": MODEL_NAME, "prompt": "Shall I compare thee", "max_tokens": 12, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def replicated(local_ray, chat_model_dir):
    made = []

    def replicas(config):
        made.append(start_replicas(config, ReplicaSettings(2, "round_robin", num_threads=1)))
        return made[-1]

    # No C++ kernels in the actors: a restarted actor must not compile (nor be killed while it compiles).
    server = LiveServer(chat_model_dir, replicas=replicas, engine_kwargs={"use_kernels": False})
    yield server
    server.stop()
    stop_replicas(made[0])


def test_two_replicas_serve_the_same_answers_and_metrics_total_the_replicas(replicated, chat_model_dir):
    url = replicated.url + "/v1/completions"
    texts = {httpx.post(url, json=GOOD, timeout=60).json()["choices"][0]["text"] for _ in range(4)}
    assert len(texts) == 1  # same weights (dummy, same seed) in both replicas: greedy agrees
    with httpx.stream("POST", url, json=GOOD | {"stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == texts.pop()
    samples = parse_metrics(httpx.get(replicated.url + "/metrics").text)
    queries = [metric(samples, "sloserve:prefix_cache_queries_total", engine=e) for e in ("0", "1", "total")]
    assert queries[0] > 0 and queries[1] > 0  # round robin used both
    assert queries[2] == queries[0] + queries[1]
    blocks = [metric(samples, "sloserve:kv_cache_total_blocks", engine=e) for e in ("0", "1", "total")]
    assert blocks == [128, 128, 256]
    assert metric(samples, "sloserve:request_success_total", engine="total") == 5


def test_parallel_samples_cross_the_replica_boundary(replicated):
    """n > 1 through a replica: every choice comes back (whole and streamed), not only the first."""
    url = replicated.url + "/v1/completions"
    body = GOOD | {"n": 2, "temperature": 1.0, "seed": 7}
    whole = httpx.post(url, json=body, timeout=60).json()
    assert sorted(c["index"] for c in whole["choices"]) == [0, 1]
    assert whole["usage"]["completion_tokens"] == 2 * GOOD["max_tokens"]
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
                for i in (0, 1)}
    assert streamed == {c["index"]: c["text"] for c in whole["choices"]}  # seeded: the same two samples


def test_slo_admission_behind_the_router_refuses_only_what_no_replica_can_serve_in_time(replicated):
    router = replicated.ctx.engine.router
    router.admission = True  # what `serve --admission slo` sets
    try:
        url = replicated.url + "/v1/completions"
        refused = httpx.post(url, json=GOOD | {"slo": {"ttft_ms": 0.001}}, timeout=60)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "slo_unattainable" and "Retry-After" in refused.headers
        assert "replicas" in refused.json()["error"]["message"]
        assert httpx.post(url, json=GOOD | {"slo": {"ttft_ms": 60000}}, timeout=60).status_code == 200
    finally:
        router.admission = False
    samples = parse_metrics(httpx.get(replicated.url + "/metrics").text)
    assert metric(samples, "sloserve:request_rejected_total", reason="slo_unattainable") == 1


def _stream_and_kill_its_replica(server) -> tuple[list[dict], int]:
    """Start a long streamed request, kill its replica once tokens flow; returns the events and the replica."""
    body = GOOD | {"max_tokens": 240, "stream": True}
    events, victim = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line:
                continue
            if not line.startswith("data: ") or line == "data: [DONE]":
                events.append(line)
                continue
            event = json.loads(line[6:])
            events.append(event)
            if victim is None and event.get("choices") and event["choices"][0]["text"]:
                flight = server.ctx.engine._tracked[event["id"]]
                victim = flight.replica
                ray.kill(server.ctx.engine.actors[victim], no_restart=False)
    return events, victim


def test_a_replica_killed_mid_stream_fails_its_request_clearly_and_comes_back(replicated):
    start = time.monotonic()
    events, victim = _stream_and_kill_its_replica(replicated)
    assert time.monotonic() - start < 30  # nothing hangs
    assert events[-1] == "data: [DONE]"
    error = events[-2]
    assert error["error"]["code"] == "engine_stopped", error
    assert not any(e.get("choices", [{}])[0].get("finish_reason") for e in events if isinstance(e, dict) and "choices" in e)
    router = replicated.ctx.engine.router
    assert not router.loads[victim].ready  # routed around at once
    # Later requests succeed (on the survivor while the victim restarts) ...
    for _ in range(3):
        assert httpx.post(replicated.url + "/v1/completions", json=GOOD, timeout=60).status_code == 200
    # ... and Ray restarts the victim, which the router takes back once it reports ready.
    assert wait_until(lambda: router.loads[victim].ready, timeout=90, interval=0.2)
    statuses = [httpx.post(replicated.url + "/v1/completions", json=GOOD, timeout=60).status_code for _ in range(4)]
    assert statuses == [200] * 4
    assert replicated.ctx.engine.num_unfinished == 0


def test_requests_sent_to_a_replica_that_just_died_are_retried_elsewhere(replicated):
    router = replicated.ctx.engine.router
    assert wait_until(lambda: len(router.ready_replicas) == 2, timeout=90, interval=0.2)
    ray.kill(replicated.ctx.engine.actors[0], no_restart=False)

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(replicated.url + "/v1/completions", json=GOOD) for _ in range(6)))

    responses = asyncio.run(burst())
    # Nothing had streamed when the replica died: every request is answered, none lost or failed.
    assert [r.status_code for r in responses] == [200] * 6
    assert wait_until(lambda: len(router.ready_replicas) == 2, timeout=90, interval=0.2)

