"""The server's own prefix-cache counters from its Prometheus /metrics, for servers that report them (vLLM, sloserve)."""
from __future__ import annotations

import re

import httpx

# vLLM's counters (in tokens); sloserve reports the same pair, under `sloserve:` until it adopts `vllm:`.
_NAMES = ("prefix_cache_queries_total", "prefix_cache_hits_total")


def prefix_cache_counters(base_url: str, api_key: str | None = None) -> tuple[float, float] | None:
    """(queries, hits) in tokens, summed over label sets; None when /metrics is missing or has no such series."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/metrics", timeout=5, headers=headers)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    totals = []
    for name in _NAMES:
        values = re.findall(rf"^(?:vllm|sloserve):{name}(?:\{{[^}}]*\}})? (\S+)$", response.text, re.M)
        if not values:
            return None
        totals.append(sum(float(v) for v in values))
    return totals[0], totals[1]


def prefix_cache_delta(before: tuple[float, float] | None, after: tuple[float, float] | None) -> dict | None:
    """What a run added to the counters, with the hit rate (hits / queried tokens)."""
    if before is None or after is None:
        return None
    queries, hits = after[0] - before[0], after[1] - before[1]
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries > 0 else None}
