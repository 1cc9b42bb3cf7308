"""`sloserve bench --tokenize-prompt` against a real server: the ids the bench sends are the ones the server computes."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from sloserve.bench.tokens import HFTokenizer
from sloserve.bench.workload import Workload
from sloserve.cli import app


def test_token_id_prompts_reach_the_server_as_sent(server, chat_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["bench", "--base-url", server.url, "--tokenizer", str(chat_model_dir), "--tokenize-prompt",
            "--random-prefix-len", "32", "--random-input-len", "8", "--random-output-len", "3", "--num-prompts", "4",
            "--arrival", "synchronous", "--ignore-eos", "--seed", "5", "--result-dir", str(out), "--no-plots",
            "--disable-tqdm"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "results.json").read_text())
    sent = Workload.from_dict(saved["config"]["workload"]).requests(HFTokenizer(str(chat_model_dir)))
    assert all(isinstance(s.prompt, list) and len(s.prompt) == 40 for s in sent)
    records = saved["runs"][0]["records"]
    # The server's usage counts exactly the ids sent (text would be re-tokenized, specials added or merged).
    assert [r["prompt_tokens"] for r in records] == [len(s.prompt) for s in sent]
    assert all(r["output_tokens"] == 3 and r["error_kind"] is None for r in records)
    # Every measured prompt starts with the same 32 ids, so its first two 16-token blocks are found in the
    # server's prefix cache, as they would not be if the server had computed other tokens.
    assert len({tuple(s.prompt[:32]) for s in sent}) == 1
    assert saved["config"]["server_prefix_cache"]["hits"] >= 4 * 32
