"""The bench reads the server's spec-decode counters: acceptance rate and mean accepted length over the run."""
import json

import httpx
from typer.testing import CliRunner

from sloserve.bench.server_counters import spec_decode_counters, spec_decode_delta
from sloserve.cli import app
from tests.server.serverkit import MODEL_NAME, LiveServer, metric, save_chat_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
NAMES = ("num_drafts_total", "num_draft_tokens_total", "num_accepted_tokens_total")


def test_the_bench_report_shows_the_servers_mean_accepted_length(tmp_path):
    # A tiny random model decoding greedily falls into repeats, which prompt lookup drafts.
    server = LiveServer(save_chat_model(tmp_path / "model"), engine_kwargs={"speculative_config": NGRAM})
    try:
        before = server.metrics()
        result = CliRunner().invoke(app, [
            "bench", "--base-url", server.url, "--model", MODEL_NAME, "--dataset-name", "random",
            "--random-input-len", "16", "--random-output-len", "48", "--random-vocab-size", "300", "--num-prompts", "4",
            "--max-concurrency", "2", "--num-warmups", "0", "--ignore-eos", "--disable-tqdm", "--no-plots",
            "--result-dir", str(tmp_path / "out"),
        ])
        after = server.metrics()
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    drafts, drafted, accepted = (metric(after, f"sloserve:spec_decode_{n}") - metric(before, f"sloserve:spec_decode_{n}")
                                 for n in NAMES)
    assert drafts > 0 and accepted > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["config"]["server_spec_decode"]
    assert saved == {"num_drafts": drafts, "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
                     "acceptance_rate": accepted / drafted, "mean_accepted_length": 1 + accepted / drafts}
    shown = f"mean accepted length {1 + accepted / drafts:.2f} tokens per verification, acceptance rate {accepted / drafted:.1%}"
    assert shown in " ".join(result.output.split())  # rich wraps at the terminal's width
    report = CliRunner().invoke(app, ["bench", "report", str(tmp_path / "out" / "results.json"), "--no-plots"])
    assert report.exit_code == 0 and shown in " ".join(report.output.split())


def test_vllm_names_count_once_and_a_server_without_speculation_reports_none(monkeypatch):
    text = "".join(f'{prefix}:spec_decode_{n}{{model_name="m"}} {v}\n'
                   for prefix in ("vllm", "sloserve") for n, v in zip(NAMES, (10.0, 30.0, 12.0)))
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text=text))
    assert spec_decode_counters("http://x") == (10.0, 30.0, 12.0)  # exported under both prefixes: counted once
    assert spec_decode_delta((2.0, 6.0, 2.0), spec_decode_counters("http://x")) == {
        "num_drafts": 8.0, "num_draft_tokens": 24.0, "num_accepted_tokens": 10.0, "acceptance_rate": 10 / 24,
        "mean_accepted_length": 1 + 10 / 8}
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text="vllm:num_requests_running 1\n"))
    assert spec_decode_counters("http://x") is None and spec_decode_delta(None, None) is None
