"""One bad request never hurts another: poisons get their own 4xx/5xx while neighbours in flight all succeed."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from serverkit import MODEL_NAME, metric, wait_until
from sloserve.server.admission import AdmissionLimits

JSON = {"content-type": "application/json"}
GOOD = {"model": MODEL_NAME, "prompt": "Shall I compare thee", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
# Each was a 500 that failed every request sharing its step (or froze the loop) before.
POISONS = [
    {"prompt": "hi", "max_tokens": 1, "top_p": 1e-46},        # 0 in float32: every token filtered
    {"prompt": "hi", "max_tokens": 1, "temperature": 1e-46},  # 0 in float32: logits / 0
    {"prompt": "hi", "max_tokens": 1, "temperature": 1e-39},  # subnormal: 1/T is inf, CUDA's x*(1/T) NaN
    {"prompt": "hi", "max_tokens": 1, "temperature": 1e39},   # inf in float32
    {"prompt": "hi", "max_tokens": 1, "temperature": 0.5, "seed": 2**64},  # outside int64
    {"prompt": "hi", "max_tokens": 1, "temperature": 0.5, "seed": -(2**63) - 1},
]


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def test_poisoned_neighbours_all_succeed(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.01)
    alone = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"][0]["text"]
    bodies = [GOOD] * 6 + [p | {"model": MODEL_NAME} for p in POISONS] + [GOOD] * 6
    responses = asyncio.run(_post_all(server.url, bodies))
    good = [r for r, b in zip(responses, bodies) if b is GOOD]
    bad = [r for r, b in zip(responses, bodies) if b is not GOOD]
    assert [r.status_code for r in good] == [200] * 12
    assert {r.json()["choices"][0]["text"] for r in good} == {alone}
    for r, poison in zip(bad, POISONS):
        assert r.status_code == 400, r.text
        param = next(k for k in ("top_p", "temperature", "seed") if k in r.json()["error"]["message"])
        assert param in poison
    assert wait_until(lambda: metric(server.metrics(), "sloserve:kv_cache_used_blocks") == 0)


def test_a_request_that_fails_in_the_executor_fails_alone(chat_model_dir, start_server):
    """A fault validation cannot foresee (here: the sampler raises for one seed) costs only its request."""
    server = start_server(chat_model_dir, step_delay_s=0.01)
    sampler = server.engine.executor.sampler
    real_sample = sampler.sample

    def sample(logits, request_ids, params, *histories):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, request_ids, params, *histories)

    sampler.sample = sample
    alone = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"][0]["text"]
    poison = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 8, "temperature": 0.7, "seed": 666}
    streamed = GOOD | {"stream": True}
    bodies = [GOOD] * 4 + [poison, poison | {"stream": True}] + [GOOD] * 3 + [streamed]
    responses = asyncio.run(_post_all(server.url, bodies))
    assert [r.status_code for r in responses[:4] + responses[6:9]] == [200] * 7
    assert {r.json()["choices"][0]["text"] for r in responses[:4] + responses[6:9]} == {alone}
    failed = responses[4]
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert "inf, nan" not in failed.text  # the exception's text stays in the log
    events = [json.loads(line[6:]) for line in responses[5].text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "engine_error" and responses[5].text.rstrip().endswith("data: [DONE]")
    text = "".join(e["choices"][0]["text"] for e in _events(responses[9].text) if e.get("choices"))
    assert text == alone
    m = server.metrics()
    assert metric(m, "sloserve:request_success_total", finished_reason="error") == 2
    assert wait_until(lambda: metric(server.metrics(), "sloserve:kv_cache_used_blocks") == 0)
    assert server.ctx.engine.is_running  # the loop never died


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("path,make_body", [
    ("/v1/completions", lambda text: {"prompt": text}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}),
], ids=["completion", "chat"])
def test_a_huge_prompt_does_not_stall_other_streams(chat_model_dir, start_server, path, make_body):
    server = start_server(chat_model_dir, step_delay_s=0.005, max_body_bytes=8 << 20)
    gaps: list[float] = []
    started = threading.Event()

    def stream() -> None:
        body = GOOD | {"max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            last = None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    huge = "Shall I compare thee to a summer's day? " * 100_000  # ~4 MiB
    r = httpx.post(server.url + path, json={"model": MODEL_NAME, "max_tokens": 4} | make_body(huge), timeout=60)
    reader.join(60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(gaps) > 50 and max(gaps) < 1.0, max(gaps)


def test_tokenizing_runs_off_the_event_loop(chat_model_dir, start_server):
    server = start_server(chat_model_dir)
    tokenizer = server.ctx.tokens.tokenizer
    threads: list[str] = []
    real_encode = tokenizer.encode

    def encode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_encode(*args, **kwargs)

    tokenizer.encode = encode
    try:
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert httpx.post(server.url + "/v1/chat/completions", json=chat).status_code == 200
    finally:
        tokenizer.encode = real_encode
    assert len(threads) == 2 and all(name.startswith("sloserve-tokenize") for name in threads)


def test_a_burst_fills_free_running_slots_before_counting_a_queue(chat_model_dir, start_server):
    server = start_server(chat_model_dir, engine_kwargs={"max_num_seqs": 8},
                          admission=AdmissionLimits(max_waiting_requests=1))
    responses = asyncio.run(_post_all(server.url, [GOOD | {"max_tokens": 4}] * 8))
    assert [r.status_code for r in responses] == [200] * 8


def test_requests_cut_at_shutdown_end_with_an_error_not_a_200(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.02, engine_kwargs={"max_num_seqs": 1})
    results: list[httpx.Response] = []
    body = GOOD | {"max_tokens": 200}
    thread = threading.Thread(target=lambda: results.append(
        httpx.post(server.url + "/v1/completions", json=body, timeout=60)))
    thread.start()
    assert wait_until(lambda: metric(server.metrics(), "sloserve:num_requests_running") == 1)
    server.call(server.ctx.drain(grace_s=0.2))
    thread.join(30)
    (r,) = results
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted"
