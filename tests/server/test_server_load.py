"""Under load and misuse: every accepted request ends and frees its KV blocks; overload gets 429, not a queue."""
from __future__ import annotations

import asyncio
import random

import httpx

from serverkit import MODEL_NAME, metric, wait_until
from sloserve.server.admission import AdmissionLimits

LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=200)


def _idle(server) -> bool:
    m = server.metrics()
    return (metric(m, "sloserve:num_requests_running") == 0 and metric(m, "sloserve:num_requests_waiting") == 0
            and metric(m, "sloserve:kv_cache_used_blocks") == 0)


async def _fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Post all bodies at once; those with `messages` go to chat, the rest to completions."""
    async with httpx.AsyncClient(base_url=url, limits=LIMITS, timeout=120) as client:
        paths = ["/v1/chat/completions" if "messages" in b else "/v1/completions" for b in bodies]
        return await asyncio.gather(*(client.post(p, json=b) for p, b in zip(paths, bodies)))


def test_100_concurrent_requests_all_complete(chat_model_dir, start_server):
    # A small KV cache (48 blocks of 16 for up to 16 sequences) also forces preemption on the way.
    server = start_server(chat_model_dir, engine_kwargs={"num_kv_blocks": 48})
    rng = random.Random(0)
    bodies = []
    for i in range(100):
        body = {"model": MODEL_NAME, "max_tokens": rng.randint(4, 24), "temperature": rng.choice([0, 0.8]), "seed": i,
                "ignore_eos": True, "stream": i % 2 == 0}
        if i % 10 == 0:
            body["messages"] = [{"role": "user", "content": f"Request {i}: compare thee to a summer's day"}]
        elif i % 3:
            body["prompt"] = [rng.randrange(5, 384) for _ in range(rng.randint(4, 60))]
        else:
            body["prompt"] = "Shall I compare thee"
        bodies.append(body)
    responses = asyncio.run(_fire(server.url, bodies))
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        if body["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in r.text
        else:
            assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]
    assert wait_until(lambda: _idle(server))
    m = server.metrics()
    assert metric(m, "sloserve:request_success_total", finished_reason="length") == 100
    assert metric(m, "sloserve:generation_tokens_total") == sum(b["max_tokens"] for b in bodies)
    assert metric(m, "sloserve:time_to_first_token_seconds_count") == 100
    assert metric(m, "sloserve:kv_cache_total_blocks") == 48


def test_overload_gets_429_and_admitted_requests_complete(chat_model_dir, start_server):
    server = start_server(chat_model_dir, engine_kwargs={"max_num_seqs": 2}, step_delay_s=0.01,
                          admission=AdmissionLimits(max_waiting_requests=4, max_waiting_tokens=10_000))
    bodies = [{"prompt": [7, 8, 9, 10], "max_tokens": 8, "ignore_eos": True} for _ in range(30)]
    responses = asyncio.run(_fire(server.url, bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 4  # at least the four that fit the waiting queue
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: _idle(server))
    m = server.metrics()
    assert metric(m, "sloserve:request_success_total") == codes.count(200)
    assert metric(m, "sloserve:request_rejected_total", reason="queue_full") == codes.count(429)


def test_waiting_token_bound_gets_429(chat_model_dir, start_server):
    server = start_server(chat_model_dir, engine_kwargs={"max_num_seqs": 1}, step_delay_s=0.01,
                          admission=AdmissionLimits(max_waiting_requests=100, max_waiting_tokens=100))
    bodies = [{"prompt": [7] * 40, "max_tokens": 4} for _ in range(10)]
    codes = [r.status_code for r in asyncio.run(_fire(server.url, bodies))]
    assert 429 in codes and 200 in codes
    assert wait_until(lambda: _idle(server))


def test_disconnect_mid_stream_aborts_and_frees_blocks(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.02)
    body = {"prompt": "Latency is what a user feels", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            seen = [line for _, line in zip(range(6), lines)]  # a few chunks, then hang up
            assert any(line.startswith("data: {") for line in seen)
            assert metric(server.metrics(), "sloserve:kv_cache_used_blocks") > 0
    # 200 tokens at 20 ms a step would take 4 s: an abort shows up long before.
    assert wait_until(lambda: metric(server.metrics(), "sloserve:request_success_total", finished_reason="abort") == 1,
                      timeout=2.0)
    assert _idle(server)
    assert metric(server.metrics(), "sloserve:generation_tokens_total") < 200


def test_disconnect_while_waiting_for_a_full_response_aborts(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.02)
    body = {"prompt": "Latency is what a user feels", "max_tokens": 200, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        raise AssertionError("the request should have timed out")
    except httpx.TimeoutException:
        pass
    assert wait_until(lambda: metric(server.metrics(), "sloserve:request_success_total", finished_reason="abort") == 1,
                      timeout=2.0)
    assert _idle(server)
