"""The server's own prefix-cache and spec-decode counters from its Prometheus /metrics, for servers that report them
(vLLM, sloserve)."""
from __future__ import annotations

import re

import httpx

# vLLM's counters (in tokens); sloserve reports the same pair, under `sloserve:` until it adopts `vllm:`.
_NAMES = ("prefix_cache_queries_total", "prefix_cache_hits_total")


# vLLM's spec-decode counters: verifications, drafted tokens, accepted tokens.
_SPEC_NAMES = ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total")


def _scrape(base_url: str, api_key: str | None) -> str | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/metrics", timeout=5, headers=headers)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def _totals(text: str | None, names: tuple[str, ...]) -> tuple[float, ...] | None:
    """Each series summed over its label sets; None when any is missing.

    A server exporting both prefixes (sloserve under --metrics-compat vllm) counts once: the first prefix found.
    """
    if text is None:
        return None
    totals = []
    for name in names:
        for prefix in ("vllm", "sloserve"):
            values = re.findall(rf"^{prefix}:{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
            if values:
                break
        if not values:
            return None
        totals.append(sum(float(v) for v in values))
    return tuple(totals)


def prefix_cache_counters(base_url: str, api_key: str | None = None) -> tuple[float, float] | None:
    """(queries, hits) in tokens, summed over label sets; None when /metrics is missing or has no such series."""
    return _totals(_scrape(base_url, api_key), _NAMES)


def spec_decode_counters(base_url: str, api_key: str | None = None) -> tuple[float, float, float] | None:
    """(verifications, drafted tokens, accepted tokens); None when the server does not speculate or report it."""
    return _totals(_scrape(base_url, api_key), _SPEC_NAMES)


def prefix_cache_delta(before: tuple[float, float] | None, after: tuple[float, float] | None) -> dict | None:
    """What a run added to the counters, with the hit rate (hits / queried tokens)."""
    if before is None or after is None:
        return None
    queries, hits = after[0] - before[0], after[1] - before[1]
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries > 0 else None}


def spec_decode_delta(before: tuple[float, ...] | None, after: tuple[float, ...] | None) -> dict | None:
    """What a run added: acceptance rate (accepted / drafted) and mean accepted length (tokens a verification
    emitted, the target's own included: 1 + accepted / verifications, as vLLM's logger reports it)."""
    if before is None or after is None:
        return None
    drafts, drafted, accepted = (a - b for a, b in zip(after, before))
    return {"num_drafts": drafts, "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted > 0 else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts > 0 else None}
