"""`sloserve bench` with `vllm bench serve`'s spellings, and prompts of exactly the asked length."""
import json
from pathlib import Path

import numpy as np
from bench_fake_server import Behaviour, FakeOpenAIServer, Script
from typer.testing import CliRunner

import sloserve
from sloserve.bench.lengths import LengthDist
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.tokens import HFTokenizer
from sloserve.cli import app

RUNNER = CliRunner()
TOKENIZER_DIR = Path(sloserve.__file__).parent / "assets" / "demo-target"


def test_random_prompts_have_exactly_the_asked_length_with_a_tokenizer():
    tok = HFTokenizer(str(TOKENIZER_DIR))
    for fmt in ("ids", "words"):
        source = SyntheticSource(LengthDist(64, "uniform", 0.5), LengthDist(4), vocab_size=tok.vocab_size, prompt_format=fmt)
        rng = np.random.default_rng(1)
        for prompt, prompt_len, _ in source.sample(40, rng, np.random.default_rng(2), tok):
            assert isinstance(prompt, str) and len(tok.encode(prompt)) == prompt_len
        lengths = [n for _, n, _ in source.sample(40, np.random.default_rng(1), np.random.default_rng(2), tok)]
        asked = LengthDist(64, "uniform", 0.5).sample(40, np.random.default_rng(1))
        assert lengths == list(asked), fmt


def test_vllm_flag_spellings(tmp_path):
    out = tmp_path / "run"
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.01, gap_s=0.01))) as srv:
        host, port = srv.base_url.removeprefix("http://").split(":")
        res = RUNNER.invoke(app, [
            "bench", "--host", host, "--port", port, "--num-prompts", "3", "--random-input-len", "4",
            "--random-output-len", "3", "--goodput", "ttft:2000 tpot:1000", "--percentile-metrics", "ttft,e2el",
            "--metadata", "gpu=none", "--metadata", "run=7", "--save-result", "--save-detailed",
            "--result-filename", "mine.json", "--disable-tqdm", "--result-dir", str(out), "--no-plots",
        ])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "mine.json").read_text())
    assert saved["config"]["slo"] == {"ttft_s": 2.0, "tpot_s": 1.0, "e2e_s": None}
    assert saved["config"]["metadata"] == {"gpu": "none", "run": "7"}
    assert saved["config"]["client"]["base_url"] == srv.base_url
    latency_rows = {line.split("│")[1].strip() for line in res.output.splitlines() if line.count("│") > 3}
    assert {"TTFT", "E2E"} <= latency_rows and not {"TPOT", "ITL"} & latency_rows
    assert "benchmark" not in res.output.split("Serving benchmark")[0]  # no progress bar


def test_a_server_that_is_down_is_named_as_such(tmp_path):
    res = RUNNER.invoke(app, ["bench", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1",
                              "--result-dir", str(tmp_path)])
    assert res.exit_code == 2 and "no server answers at http://127.0.0.1:9" in res.output
