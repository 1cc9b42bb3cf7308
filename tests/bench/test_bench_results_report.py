"""The results file round-trips, and `report` renders tables, CSV and plots from it alone."""
import csv
import io
import json

import pytest
from rich.console import Console

from sloserve.bench.records import RequestRecord
from sloserve.bench.report import render, summaries, write_csv
from sloserve.bench.results import SCHEMA, VERSION, BenchResults, Run, capture_environment
from sloserve.bench.session import write_outputs
from sloserve.bench.slo import SLO


def record(i, send, ttft, gap, n, error=None):
    times = [] if error else [send + ttft + k * gap for k in range(n)]
    return RequestRecord(i, send, send, 10, n, times, [1] * len(times), send + 1, send + 0.0005,
                         0 if error else n, "usage", None if error else 10, 429 if error else 200, error,
                         "scripted 429" if error else None, None if error else "length")


def results(sweep=False):
    runs = []
    for k, rate in enumerate([2.0, 4.0] if sweep else [2.0]):
        recs = [record(i, i / rate, 0.1 + 0.1 * k, 0.02, 5) for i in range(4)] + [record(4, 2.0, 0, 0, 0, "http_429")]
        runs.append(Run(f"rate={rate:g}", {"kind": "poisson", "rate": rate, "burstiness": 1.0}, None, 0,
                        1.7e9, 3.0, recs))
    info = {"target_attainment": 0.9, "max_goodput_rate": 2.0, "upper_rate": 4.0, "config": {},
            "probes": [{"rate": 2.0, "attainment": 0.8, "run": 0}, {"rate": 4.0, "attainment": 0.0, "run": 1}]}
    config = {"slo": SLO(ttft_s=0.15).to_dict(), "percentiles": [50, 90, 99]}
    return BenchResults(config, capture_environment(), runs, info if sweep else None, "client", 1.7e9)


def test_round_trip_is_lossless_and_strict_json(tmp_path):
    res = results(sweep=True)
    path = tmp_path / "r.json"
    res.save(str(path))
    raw = json.loads(path.read_text())  # strict JSON: no NaN/Infinity tokens
    assert raw["schema"] == SCHEMA and raw["version"] == VERSION and len(raw["runs"]) == 2
    assert raw["runs"][0]["records"][0]["token_times_s"] == pytest.approx([0.1, 0.12, 0.14, 0.16, 0.18])
    assert raw["runs"][0]["records"][4]["success"] is False
    again = BenchResults.load(str(path))
    assert again.to_dict() == res.to_dict()
    assert again.runs[0].records[0] == res.runs[0].records[0]


def test_loader_rejects_other_files_and_versions():
    d = results().to_dict()
    with pytest.raises(ValueError, match="schema"):
        BenchResults.from_dict({**d, "schema": "something-else"})
    with pytest.raises(ValueError, match="version"):
        BenchResults.from_dict({**d, "version": VERSION + 1})


def test_render_recomputes_from_records_with_saved_or_overridden_slo():
    res = results()
    sums = summaries(res)
    assert sums[0].attainment == pytest.approx(4 / 5) and list(sums[0].ttft.percentiles) == [50, 90, 99]
    console = Console(file=io.StringIO(), width=200, record=True)
    render(res, sums, console)
    text = " ".join(console.export_text().split())  # undo the console's line wrapping
    for expected in ("Successful requests", "TTFT", "100.00", "180.00", "20.00", "80.0%",
                     "http_429", "scripted 429", "Percentiles: numpy linear interpolation"):
        assert expected in text
    strict = summaries(res, percentiles=(99.9,), slo=SLO(ttft_s=0.05))
    assert strict[0].attainment == 0.0 and list(strict[0].ttft.percentiles) == [99.9]


def test_csv_and_plots_written(tmp_path):
    res = results(sweep=True)
    console = Console(file=io.StringIO(), width=200, record=True)
    paths = write_outputs(res, str(tmp_path), console)
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == ["latency_vs_rate.png", "results.json", "summary.csv", "tpot_cdf.png", "ttft_cdf.png"]
    for p in paths:
        if p.endswith(".png"):
            assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["label"] for r in rows] == ["rate=2", "rate=4"]
    assert float(rows[0]["ttft_p50_ms"]) == pytest.approx(100.0)
    assert float(rows[1]["ttft_p50_ms"]) == pytest.approx(200.0)
    assert float(rows[0]["attainment"]) == pytest.approx(0.8) and float(rows[1]["attainment"]) == 0.0
    assert rows[0]["completed"] == "4" and rows[0]["errors"] == "http_429: 1"
    text = console.export_text()
    assert "All runs" in text and "Max goodput rate" in text and "2 req/s" in text
    assert "Serving benchmark result" not in text  # sweeps show the curve, not every run's tables


def test_write_csv_matches_summaries(tmp_path):
    res = results()
    sums = summaries(res)
    write_csv(res, sums, str(tmp_path / "s.csv"))
    row = next(csv.DictReader(open(tmp_path / "s.csv")))
    assert float(row["request_throughput"]) == pytest.approx(sums[0].request_throughput)
    assert float(row["tpot_mean_ms"]) == pytest.approx(20.0)


def test_simulator_results_render_without_client_fields():
    res = results()
    res.source = "simulator"
    for r in res.runs[0].records:
        r.wire_s = None  # a simulator has no socket
    res = BenchResults.from_dict(json.loads(json.dumps(res.to_dict())))
    console = Console(file=io.StringIO(), width=200, record=True)
    render(res, summaries(res), console)
    text = console.export_text()
    assert "(simulated)" in text and "Client send overhead" not in text and "80.0%" in text
