"""/metrics reports prefix-cache queries and hits in tokens, as vLLM does; the bench reads them back."""
from __future__ import annotations

import httpx

from serverkit import MODEL_NAME, metric, wait_until
from sloserve.bench.server_counters import prefix_cache_counters, prefix_cache_delta


def test_a_repeated_prompt_is_counted_as_a_hit_and_answered_the_same(server):
    prompt = [5 + (7 * i) % 300 for i in range(40)]  # 2 full blocks of 16 and a tail of 8
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    before, bench_before = server.metrics(), prefix_cache_counters(server.url)
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["usage"]["prompt_tokens"] == 40

    def delta(name: str) -> float:
        return metric(server.metrics(), name) - metric(before, name)

    # The second request reuses both full blocks; the stats are snapshotted between steps.
    assert wait_until(lambda: delta("sloserve:prefix_cache_hits_total") == 32)
    assert delta("sloserve:prefix_cache_queries_total") == 80
    assert prefix_cache_delta(bench_before, prefix_cache_counters(server.url)) == {
        "queries": 80, "hits": 32, "hit_rate": 0.4}


def test_the_bench_reads_vllm_names_and_says_none_without_them(monkeypatch):
    text = ('vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
            'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 50.0\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 30.0\n'
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 0.0\n')
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text=text))
    assert prefix_cache_counters("http://x") == (150.0, 30.0)
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text="other_metric 1\n"))
    assert prefix_cache_counters("http://x") is None
    assert prefix_cache_delta(None, (1.0, 1.0)) is None
