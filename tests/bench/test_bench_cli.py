"""`sloserve bench ...` and `sloserve bench report RESULTS.json` through the real top-level CLI."""
import json

from bench_fake_server import Behaviour, FakeOpenAIServer, Script
from typer.testing import CliRunner

from sloserve.cli import app

RUNNER = CliRunner()


def test_bench_runs_then_report_rerenders(tmp_path):
    out = tmp_path / "run"
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.02, gap_s=0.01))) as srv:
        res = RUNNER.invoke(app, [
            "bench", "--base-url", srv.base_url, "--endpoint", "/v1/chat/completions",
            "--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "4", "--max-concurrency", "2",
            "--num-warmups", "1", "--ignore-eos", "--slo", "ttft=2s,tpot=1s", "--result-dir", str(out),
        ])  # a loose SLO: the scripted 20 ms / 10 ms meet it even on a busy machine
        bodies = srv.bodies()
    assert res.exit_code == 0, res.output
    assert "SLO attainment" in res.output and "100.0%" in res.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["client"]["model"] == "fake-model"  # taken from /v1/models
    assert saved["config"]["workload"]["source"]["prompt_format"] == "words"  # chat without a tokenizer
    assert len(saved["runs"]) == 1 and len(saved["runs"][0]["records"]) == 6
    assert all(r["success"] and r["output_tokens"] == 4 for r in saved["runs"][0]["records"])
    chat = bodies[-1]
    assert chat["messages"][0]["role"] == "user" and len(chat["messages"][0]["content"].split()) == 8
    assert chat["ignore_eos"] is True and chat["max_completion_tokens"] == 4
    assert {p.name for p in out.iterdir()} >= {"results.json", "summary.csv", "ttft_cdf.png", "tpot_cdf.png"}

    again = tmp_path / "again"
    res = RUNNER.invoke(app, ["bench", "report", str(out / "results.json"), "--out-dir", str(again),
                              "--percentiles", "50,99.9", "--slo", "ttft=1ms"])
    assert res.exit_code == 0, res.output
    assert "p99.9" in res.output and "0.0%" in res.output  # re-judged against the stricter SLO
    assert (again / "summary.csv").exists() and (again / "ttft_cdf.png").exists()


def test_bad_arguments_exit_cleanly(tmp_path):
    for args, message in ((["--slo", "ttft=soon"], "bad SLO"), (["--sweep"], "--sweep needs --slo"),
                          (["--dataset-name", "nope"], "dataset-name"),
                          (["--arrival", "poisson"], "finite --request-rate"),
                          (["--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "no.json")], "No such file")):
        res = RUNNER.invoke(app, ["bench", "--model", "m", "--result-dir", str(tmp_path), *args])
        assert res.exit_code == 2 and message in res.output, res.output
    res = RUNNER.invoke(app, ["bench", "report", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "error" in res.output


def test_local_tokenizer_decodes_prompts_and_counts_output(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat and dog ran far".split()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "run"
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.01, gap_s=0.01, usage=False))) as srv:
        res = RUNNER.invoke(app, ["bench", "--base-url", srv.base_url, "--model", "m", "--tokenizer",
                                  str(tmp_path / "tok"), "--num-prompts", "3", "--random-input-len", "6",
                                  "--random-output-len", "4", "--result-dir", str(out), "--no-plots"])
        bodies = srv.bodies()
    assert res.exit_code == 0, res.output
    records = json.loads((out / "results.json").read_text())["runs"][0]["records"]
    # Server sent " t0 t1 t2 t3" and no usage: the tokenizer counts 4 ([UNK]) tokens.
    assert all(r["output_tokens_source"] == "tokenizer" and r["output_tokens"] == 4 for r in records)
    assert all(r["prompt_len"] == 6 for r in records)
    assert all(isinstance(b["prompt"], str) and set(b["prompt"].split()) <= set(words) for b in bodies)
    assert not (out / "ttft_cdf.png").exists()


def test_unreachable_server_still_writes_results(tmp_path):
    res = RUNNER.invoke(app, ["bench", "--base-url", "http://127.0.0.1:9", "--model", "m", "--num-prompts", "2",
                              "--random-input-len", "4", "--random-output-len", "2", "--result-dir", str(tmp_path),
                              "--api-key", "sk-secret", "--no-plots"])
    assert res.exit_code == 1 and "no request succeeded" in res.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["error_kind"] for r in saved["runs"][0]["records"]] == ["connection", "connection"]
    assert "sk-secret" not in json.dumps(saved)  # the API key never reaches the results file
