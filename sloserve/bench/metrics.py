"""Metric math, as `vllm bench serve` defines it: TTFT, TPOT, ITL, E2E, throughput, SLO attainment, goodput."""
# Averaging choices (stated in every report):
#   * TTFT, E2E: one value per successful request; mean and percentiles over requests.
#   * TPOT: per request (E2E - TTFT) / (output tokens - 1), only requests with
#     > 1 output token; then mean/percentiles over requests (request-weighted,
#     not token-weighted).
#   * ITL: every gap between consecutive token-bearing chunks, pooled over all
#     successful requests (a chunk with several tokens is one gap).
#   * Percentiles: numpy's default linear interpolation between order
#     statistics (numpy.percentile, method="linear"), as vLLM.
#   * Throughputs and goodput divide by the run's duration: start of the run
#     (first scheduled arrival) to the end of the last request.
#   * Token totals count successful requests only; input tokens are the
#     server's usage.prompt_tokens when reported, else the workload's length.
#   * SLO attainment: share of ALL issued requests (failed ones included,
#     never meeting it); warm-ups are excluded everywhere.
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sloserve.bench.records import RequestRecord
from sloserve.bench.slo import SLO

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)


@dataclass(slots=True)
class RequestMetrics:
    ttft_s: float
    e2e_s: float
    tpot_s: float | None  # None for a single-token reply
    itl_s: list[float]


def request_metrics(r: RequestRecord) -> RequestMetrics | None:
    """None for a failed request: it has no latency, only an error."""
    if not r.success:
        return None
    ttft = r.token_times_s[0] - r.send_s
    e2e = r.token_times_s[-1] - r.send_s
    tpot = (e2e - ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None
    itl = [b - a for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    return RequestMetrics(ttft, e2e, tpot, itl)


@dataclass(slots=True)
class Stats:
    count: int
    mean: float | None
    std: float | None  # population std (ddof=0), as numpy's default
    min: float | None
    max: float | None
    percentiles: dict[float, float | None]

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            **{pct_label(p): v for p, v in self.percentiles.items()},
        }


def pct_label(p: float) -> str:
    return f"p{p:g}"


def stats(values: list[float], percentiles=DEFAULT_PERCENTILES) -> Stats:
    if not values:
        return Stats(0, None, None, None, None, {p: None for p in percentiles})
    arr = np.asarray(values, dtype=float)
    pcts = np.percentile(arr, list(percentiles), method="linear")
    return Stats(len(arr), float(arr.mean()), float(arr.std()), float(arr.min()), float(arr.max()),
                 {p: float(v) for p, v in zip(percentiles, pcts)})


@dataclass(slots=True)
class RunSummary:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # one message per kind
    # Health of the instrument itself, not of the server: how long the client
    # took to put a request on the wire, and how late it sent vs. the schedule
    # (lateness includes waiting for a --max-concurrency slot).
    client_overhead: Stats | None = None
    send_lag: Stats | None = None
    slo: SLO | None = None
    num_good: int | None = None
    attainment: float | None = None
    goodput: float | None = None  # requests meeting the SLO per second


def summarize(records: list[RequestRecord], duration_s: float, percentiles=DEFAULT_PERCENTILES,
              slo: SLO | None = None) -> RunSummary:
    per = [(r, request_metrics(r)) for r in records]
    ok = [(r, m) for r, m in per if m is not None]
    total_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r, _ in ok)
    total_out = sum(r.output_tokens for r, _ in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    s = RunSummary(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / dur,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        ttft=stats([m.ttft_s for _, m in ok], percentiles),
        tpot=stats([m.tpot_s for _, m in ok if m.tpot_s is not None], percentiles),
        itl=stats([g for _, m in ok for g in m.itl_s], percentiles),
        e2e=stats([m.e2e_s for _, m in ok], percentiles),
        errors=dict(Counter(r.error_kind or "empty" for r, m in per if m is None)),
        error_examples={r.error_kind or "empty": r.error or "" for r, m in reversed(per) if m is None},
        client_overhead=stats([r.wire_s - r.send_s for r in records if r.wire_s is not None], percentiles),
        send_lag=stats([max(0.0, r.send_s - r.arrival_s) for r in records], percentiles),
    )
    if slo is not None and not slo.is_empty():
        good = sum(1 for _, m in ok if slo.met(m.ttft_s, m.tpot_s, m.e2e_s))
        s.slo, s.num_good = slo, good
        s.attainment = good / len(records) if records else None
        s.goodput = good / dur
    return s
