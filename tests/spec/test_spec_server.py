"""Speculation behind the server: --speculative-config, streamed chunks of several tokens, /metrics counters."""
import json

import httpx
import pytest
from typer.testing import CliRunner

from sloserve.cli import app
from tests.server.serverkit import MODEL_NAME, LiveServer, metric, save_chat_model

SPEC = {"method": "draft_model", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("spec-chat"))


def test_streamed_text_and_metrics_with_speculation(chat_dir):
    # The model drafts for itself (same weights from the same dummy seed): long accepted runs per step.
    server = LiveServer(chat_dir, engine_kwargs={"speculative_config": SPEC | {"model": str(chat_dir)}})
    try:
        body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        streamed = ""
        with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed += "".join(c["text"] for c in json.loads(line[6:])["choices"])
        assert streamed == plain["choices"][0]["text"] and plain["usage"]["completion_tokens"] == 24
        samples = server.metrics()
        drafts = metric(samples, "sloserve:spec_decode_num_drafts_total")
        accepted = metric(samples, "sloserve:spec_decode_num_accepted_tokens_total")
        drafted = metric(samples, "sloserve:spec_decode_num_draft_tokens_total")
        emitted = metric(samples, "sloserve:spec_decode_num_emitted_tokens_total")
        assert drafts > 0 and 0 < accepted <= drafted
        assert emitted == accepted + drafts
        assert metric(samples, "sloserve:spec_decode_num_accepted_tokens_per_pos_total") == accepted
        assert metric(samples, "sloserve:spec_decode_draft_acceptance_rate") == pytest.approx(accepted / drafted)
    finally:
        server.stop()


def test_bad_speculative_config_flag_is_refused_before_loading(chat_dir):
    result = CliRunner().invoke(app, ["serve", str(chat_dir), "--load-format", "dummy",
                                      "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'])
    assert result.exit_code == 2
    assert "unknown method 'medusa'" in " ".join(result.output.replace("│", " ").split())
