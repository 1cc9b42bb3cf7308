"""Console tables and the CSV summary, recomputed from a results file's raw records."""
from __future__ import annotations

import csv
import math

from rich.console import Console
from rich.table import Table

from sloserve.bench.metrics import DEFAULT_PERCENTILES, RunSummary, Stats, pct_label, summarize
from sloserve.bench.results import BenchResults
from sloserve.bench.slo import SLO

AVERAGING_NOTE = (
    "TTFT/E2E: per request, over successful requests. TPOT: per request (E2E-TTFT)/(tokens-1), "
    "requests with >1 token, then averaged over requests. ITL: all inter-chunk gaps pooled. "
    "Percentiles: numpy linear interpolation. Throughput and goodput: over the run's duration "
    "(first arrival to last completion). Attainment: over all issued requests; failures never meet it; "
    "warm-ups excluded."
)
_LATENCIES = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))


def summaries(results: BenchResults, percentiles=None, slo: SLO | None = None) -> list[RunSummary]:
    """Summaries of every run, with the saved percentiles/SLO unless overridden."""
    pcts = tuple(percentiles or results.config.get("percentiles") or DEFAULT_PERCENTILES)
    slo = slo if slo is not None else SLO.from_dict(results.config.get("slo"))
    return [summarize(run.records, run.duration_s, pcts, slo) for run in results.runs]


def render(results: BenchResults, sums: list[RunSummary], console: Console, detail: bool | None = None) -> None:
    """Per-run tables (by default only for a single run), the all-runs table, the sweep's answer."""
    detail = len(sums) == 1 if detail is None else detail
    for run, s in zip(results.runs, sums) if detail else ():
        console.print(_overview(run.label, s, results.source))
        console.print(_latency_table(s, results.config.get("percentile_metrics")))
        if s.slo is not None:
            console.print(_slo_table(s))
        if s.errors:
            console.print(_errors_table(s))
    if len(sums) > 1:
        console.print(_runs_table(results, sums))
    if results.sweep is not None:
        best, upper = results.sweep.get("max_goodput_rate"), results.sweep.get("upper_rate")
        target = results.sweep["target_attainment"]
        if best is None:
            msg = "none found (no probed rate met the target)"
        elif upper is None:
            msg = f"at least {best:.3g} req/s (no probed rate missed the target; raise --sweep-max-probes)"
        else:
            msg = f"{best:.3g} req/s (missed at {upper:.3g} req/s)"
        console.print(f"[bold]Max goodput rate[/bold] at attainment >= {target:.0%}: {msg}")
        prompts = results.sweep.get("prompts")
        if prompts is not None:  # a sweep resending its prompts is flattered by any server's prompt cache
            console.print(f"Prompts: {prompts} (shared prefixes only where the workload asks for them)")
    spec = results.config.get("server_spec_decode")
    if spec and spec.get("mean_accepted_length") is not None:
        console.print(_spec_decode_line(spec))
    console.print(f"[dim]{AVERAGING_NOTE}[/dim]")


def _spec_decode_line(spec: dict) -> str:
    """The server's own speculation counters over the run (warm-ups included: /metrics cannot tell them apart)."""
    return (f"Speculative decoding (server /metrics, warm-ups included): mean accepted length "
            f"{spec['mean_accepted_length']:.2f} tokens per verification, acceptance rate {spec['acceptance_rate']:.1%} "
            f"({spec['num_accepted_tokens']:.0f} of {spec['num_draft_tokens']:.0f} drafted tokens)")


def _overview(label: str, s: RunSummary, source: str) -> Table:
    t = Table(title=f"Serving benchmark result: {label}" + (" (simulated)" if source != "client" else ""),
              show_header=False)
    rows = [
        ("Requests issued", f"{s.num_requests}"),
        ("Successful requests", f"{s.completed}"),
        ("Failed requests", f"{s.failed}" + (f"  ({_errors(s.errors)})" if s.errors else "")),
        ("Benchmark duration (s)", f"{s.duration_s:.2f}"),
        ("Total input tokens", f"{s.total_input_tokens}"),
        ("Total generated tokens", f"{s.total_output_tokens}"),
        ("Request throughput (req/s)", _f(s.request_throughput)),
        ("Output token throughput (tok/s)", _f(s.output_throughput)),
        ("Total token throughput (tok/s)", _f(s.total_token_throughput)),
    ]
    if s.client_overhead is not None and s.client_overhead.count:
        rows.append(("Client send overhead p50 / max (ms)",
                     f"{_ms(_pct(s.client_overhead, 50))} / {_ms(_max(s.client_overhead))}"))
    if s.send_lag is not None and s.send_lag.count:
        rows.append(("Send lag after arrival, incl. concurrency wait, p50 / max (ms)",
                     f"{_ms(_pct(s.send_lag, 50))} / {_ms(_max(s.send_lag))}"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def _errors_table(s: RunSummary) -> Table:
    t = Table(title="Failed requests by kind")
    for col in ("kind", "count", "example"):
        t.add_column(col)
    for kind, n in sorted(s.errors.items()):
        t.add_row(kind, str(n), s.error_examples.get(kind, "")[:120])
    return t


def _latency_table(s: RunSummary, metrics: list[str] | None = None) -> Table:
    """metrics: vLLM's --percentile-metrics names (ttft, tpot, itl, e2el); None: all of them."""
    t = Table(title="Latency (ms)")
    pcts = list(s.ttft.percentiles)
    for col in ["metric", "n", "mean", *(("median" if p == 50 else pct_label(p)) for p in pcts)]:
        t.add_column(col, justify="right")
    for name, attr in _LATENCIES:
        if metrics is not None and attr not in metrics:
            continue
        st: Stats = getattr(s, attr)
        t.add_row(name, str(st.count), _ms(st.mean), *(_ms(st.percentiles[p]) for p in pcts))
    return t


def _slo_table(s: RunSummary) -> Table:
    t = Table(title=f"SLO: {s.slo.describe()}", show_header=False)
    t.add_row("Requests meeting SLO", f"{s.num_good} / {s.num_requests}")
    t.add_row("SLO attainment", "-" if s.attainment is None else f"{s.attainment:.1%}")
    t.add_row("Request goodput (req/s)", _f(s.goodput))
    return t


def _runs_table(results: BenchResults, sums: list[RunSummary]) -> Table:
    top = pct_label(_top(sums[0]))
    t = Table(title="All runs (latencies in ms)")
    for col in ("rate", "ok/fail", "req/s", "TTFT\np50", f"TTFT\n{top}", "TPOT\np50", f"TPOT\n{top}", "SLO\nmet",
                "goodput\nreq/s"):
        t.add_column(col, justify="right", no_wrap=True)
    for run, s in zip(results.runs, sums):
        rate = f"{run.rate:g}" if math.isfinite(run.rate) else run.label
        t.add_row(rate, f"{s.completed}/{s.failed}", _f(s.request_throughput),
                  _ms(_pct(s.ttft, 50)), _ms(_pct(s.ttft, _top(s))), _ms(_pct(s.tpot, 50)),
                  _ms(_pct(s.tpot, _top(s))), "-" if s.attainment is None else f"{s.attainment:.1%}",
                  _f(s.goodput))
    return t


def write_csv(results: BenchResults, sums: list[RunSummary], path: str) -> None:
    rows = [_csv_row(run, s) for run, s in zip(results.runs, sums)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["label"])
        w.writeheader()
        w.writerows(rows)


def _csv_row(run, s: RunSummary) -> dict:
    row = {
        "label": run.label, "arrival": run.arrivals["kind"], "request_rate": run.rate,
        "burstiness": run.arrivals["burstiness"], "max_concurrency": run.max_concurrency,
        "num_requests": s.num_requests, "completed": s.completed, "failed": s.failed,
        "duration_s": s.duration_s, "total_input_tokens": s.total_input_tokens,
        "total_output_tokens": s.total_output_tokens, "request_throughput": s.request_throughput,
        "output_throughput": s.output_throughput, "total_token_throughput": s.total_token_throughput,
    }
    for _, attr in _LATENCIES:
        st: Stats = getattr(s, attr)
        row[f"{attr}_mean_ms"] = _msv(st.mean)
        for p, v in st.percentiles.items():
            row[f"{attr}_{pct_label(p)}_ms"] = _msv(v)
    row["slo"] = s.slo.describe() if s.slo else ""
    row["attainment"] = s.attainment
    row["goodput"] = s.goodput
    row["errors"] = _errors(s.errors)
    return row


def _pct(st: Stats, p: float) -> float | None:
    return st.percentiles.get(p)


def _max(st: Stats) -> float | None:
    return st.max


def _top(s: RunSummary) -> float:
    return max(s.ttft.percentiles)


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))


def _msv(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"


def _f(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"
