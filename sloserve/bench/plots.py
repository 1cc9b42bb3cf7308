"""PNG plots of a results file: TTFT and TPOT CDFs per run, latency percentiles and attainment vs rate."""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

from sloserve.bench.metrics import RunSummary, pct_label, request_metrics  # noqa: E402
from sloserve.bench.results import BenchResults  # noqa: E402


def write_plots(results: BenchResults, sums: list[RunSummary], out_dir: str) -> list[str]:
    """Write the plots into out_dir and return their paths."""
    paths = [
        _cdf(results, sums, "ttft_s", "TTFT", os.path.join(out_dir, "ttft_cdf.png")),
        _cdf(results, sums, "tpot_s", "TPOT", os.path.join(out_dir, "tpot_cdf.png")),
    ]
    finite = [(run.rate, s) for run, s in zip(results.runs, sums) if math.isfinite(run.rate)]
    if len(finite) > 1:
        paths.append(_vs_rate(sorted(finite, key=lambda x: x[0]), results, os.path.join(out_dir, "latency_vs_rate.png")))
    return paths


def _cdf(results: BenchResults, sums: list[RunSummary], attr: str, name: str, path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in results.runs:
        vals = sorted(
            getattr(m, attr) * 1000 for m in map(request_metrics, run.records)
            if m is not None and getattr(m, attr) is not None
        )
        if vals:
            ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=run.label)
    bound = _slo_bound(sums, attr)
    if bound is not None:
        ax.axvline(bound * 1000, color="red", linestyle="--", label=f"SLO {bound * 1000:g} ms")
    ax.set_xlabel(f"{name} (ms)")
    ax.set_ylabel("fraction of successful requests")
    ax.set_title(f"{name} CDF")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _vs_rate(points: list[tuple[float, RunSummary]], results: BenchResults, path: str) -> str:
    rates = [r for r, _ in points]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, attr) in zip(axes.flat, (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E", "e2e"))):
        for p in points[0][1].ttft.percentiles:
            ys = [_ms(getattr(s, attr).percentiles[p]) for _, s in points]
            ax.plot(rates, ys, marker="o", label=pct_label(p))
        ax.set_title(f"{name} percentiles")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes.flat[3]
    ax.plot(rates, [s.attainment if s.attainment is not None else math.nan for _, s in points], marker="o",
            label="SLO attainment")
    if results.sweep is not None:
        ax.axhline(results.sweep["target_attainment"], color="red", linestyle="--", label="target")
        best = results.sweep.get("max_goodput_rate")
        if best is not None:
            ax.axvline(best, color="green", linestyle=":", label=f"max goodput rate {best:.3g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("SLO attainment and goodput")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("attainment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    if any(s.goodput is not None for _, s in points):
        twin = ax.twinx()
        twin.plot(rates, [s.goodput if s.goodput is not None else math.nan for _, s in points], marker="s",
                  color="gray", alpha=0.6)
        twin.set_ylabel("goodput (req/s, gray)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slo_bound(sums: list[RunSummary], attr: str) -> float | None:
    slo = next((s.slo for s in sums if s.slo is not None), None)
    return None if slo is None else getattr(slo, attr)


def _ms(x: float | None) -> float:
    return math.nan if x is None else x * 1000
