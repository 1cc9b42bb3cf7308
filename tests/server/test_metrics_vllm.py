"""/metrics carries vLLM's series with vLLM's types, labels and buckets, and their quantities add up."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serverkit import MODEL_NAME, metric
from sloserve.server.metrics import one_two_five_buckets

# vLLM series -> Prometheus type
VLLM_SERIES = {
    "num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
    "cache_config_info": "gauge", "request_success": "counter", "prompt_tokens": "counter",
    "generation_tokens": "counter", "num_preemptions": "counter", "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram", "iteration_tokens_total": "histogram",
    "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
    "time_per_output_token_seconds": "histogram", "request_time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram", "request_queue_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram", "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
}
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]


def families(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def value(fams: dict, name: str, suffix: str = "", **labels) -> float:
    return sum(s.value for s in fams[name].samples
               if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def finished_run(chat_model_dir):
    """A vllm-compat server after 6 requests of known lengths have ended."""
    from serverkit import LiveServer

    server = LiveServer(chat_model_dir, metrics_compat="vllm", engine_kwargs=dict(num_kv_blocks=256))
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 12, [40, 41], list(range(50, 70)), [3]]
    max_tokens = [1, 7, 12, 3, 9, 5]
    try:
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": n, "ignore_eos": True, "stream": i % 2 == 0}
            assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
        yield families(server.url), prompts, max_tokens
    finally:
        server.stop()


def test_every_vllm_series_has_its_type_and_labels_under_both_prefixes(finished_run):
    fams, _, _ = finished_run
    for short, kind in VLLM_SERIES.items():
        for prefix in ("sloserve:", "vllm:"):
            fam = fams[prefix + short]
            assert fam.type == kind, prefix + short
            assert fam.samples and all(s.labels["model_name"] == MODEL_NAME and s.labels["engine"] == "0"
                                       for s in fam.samples), prefix + short
    assert "vllm:request_rejected" not in fams and "sloserve:request_rejected" in fams  # our extra stays ours


def test_the_vllm_names_carry_the_same_numbers(finished_run):
    fams, _, _ = finished_run
    for short, kind in VLLM_SERIES.items():
        ours = {(s.name.removeprefix("sloserve:"), tuple(sorted(s.labels.items()))): s.value
                for s in fams["sloserve:" + short].samples if not s.name.endswith("_created")}
        theirs = {(s.name.removeprefix("vllm:"), tuple(sorted(s.labels.items()))): s.value
                  for s in fams["vllm:" + short].samples if not s.name.endswith("_created")}
        assert ours == theirs, short


def test_quantities_add_up(finished_run):
    fams, prompts, max_tokens = finished_run
    v = lambda name, suffix="", **labels: value(fams, "vllm:" + name, suffix, **labels)  # noqa: E731
    n, prompt_tokens, generated = len(prompts), sum(map(len, prompts)), sum(max_tokens)
    assert v("request_success", "_total", finished_reason="length") == n
    assert v("prompt_tokens", "_total") == prompt_tokens == v("request_prompt_tokens", "_sum")
    assert v("generation_tokens", "_total") == generated == v("request_generation_tokens", "_sum")
    # One inter-token gap per token after each request's first (one token per step here).
    assert v("inter_token_latency_seconds", "_count") == generated - n == v("time_per_output_token_seconds", "_count")
    assert v("request_time_per_output_token_seconds", "_count") == sum(m > 1 for m in max_tokens)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens"):
        assert v(name, "_count") == n, name
    # Each prompt token is computed once, each generated token but the last is fed back once.
    assert v("iteration_tokens_total", "_sum") == prompt_tokens + generated - n
    assert v("num_preemptions", "_total") == 0
    # TTFT = queue + prefill; inference = prefill + decode; ITL gaps sum to the decode times.
    assert v("time_to_first_token_seconds", "_sum") == pytest.approx(
        v("request_queue_time_seconds", "_sum") + v("request_prefill_time_seconds", "_sum"))
    assert v("request_inference_time_seconds", "_sum") == pytest.approx(
        v("request_prefill_time_seconds", "_sum") + v("request_decode_time_seconds", "_sum"))
    assert v("inter_token_latency_seconds", "_sum") == pytest.approx(v("request_decode_time_seconds", "_sum"))
    assert v("num_requests_running") == 0 and v("num_requests_waiting") == 0 and v("kv_cache_usage_perc") == 0
    assert v("cache_config_info", block_size="16", num_gpu_blocks="256") == 1


def test_buckets_are_vllms_and_cumulative(finished_run):
    fams, _, _ = finished_run
    expected = {"inter_token_latency_seconds": ITL_BUCKETS,
                "request_prompt_tokens": one_two_five_buckets(256),
                "time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]}
    assert one_two_five_buckets(256) == (1, 2, 5, 10, 20, 50, 100, 200)
    for short, bounds in expected.items():
        buckets = [s for s in fams["vllm:" + short].samples if s.name.endswith("_bucket")]
        assert [float(s.labels["le"]) for s in buckets] == [*map(float, bounds), float("inf")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == value(fams, "vllm:" + short, "_count")


def test_preemptions_are_counted_as_they_happen(chat_model_dir, start_server):
    import asyncio

    # 24 blocks of 4 tokens hold the four prompts but not their outputs: running requests get preempted.
    server = start_server(chat_model_dir, engine_kwargs=dict(num_kv_blocks=24, block_size=4))
    prompts = [list(range(10 + i, 22 + i)) for i in range(4)]

    async def all_of_them():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            bodies = [{"model": MODEL_NAME, "prompt": p, "max_tokens": 20, "ignore_eos": True} for p in prompts]
            return await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))

    assert all(r.status_code == 200 for r in asyncio.run(all_of_them()))
    fams = families(server.url)
    v = lambda name, suffix="": value(fams, "sloserve:" + name, suffix)  # noqa: E731
    assert v("num_preemptions", "_total") > 0
    # Recomputing a preempted request's tokens shows up in the per-step token counts.
    assert v("iteration_tokens_total", "_sum") > v("prompt_tokens", "_total") + v("generation_tokens", "_total") - 4


def test_ttft_counts_from_the_request_reaching_the_server(start_server, chat_model_dir):
    """TTFT starts when the request reaches the server, so tokenizing (here slowed down) is inside it, as a client sees it."""
    server = start_server(chat_model_dir)
    tokens = server.ctx.tokens
    tokenize = tokens.prompt
    delay_s = 0.3

    async def slow_prompt(text: str) -> list[int]:
        await asyncio.sleep(delay_s)
        return await tokenize(text)

    tokens.prompt = slow_prompt
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    samples = server.metrics()
    assert metric(samples, "sloserve:time_to_first_token_seconds_count") == 1
    assert metric(samples, "sloserve:time_to_first_token_seconds_sum") >= delay_s
    assert metric(samples, "sloserve:request_queue_time_seconds_sum") >= delay_s
