"""`sloserve profile --speculative-config` records the draft's step time and acceptance; `simulate` speculates with them."""
import json

import pytest
from typer.testing import CliRunner

from sloserve.cli import app
from sloserve.engine.features import ExecuteFeatures, token_knots

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def spec_profile(tiny_model_dir, tmp_path_factory):
    """The tiny model drafting for itself: greedy drafts are the target's own tokens, so all are accepted."""
    model = str(tiny_model_dir("smollm"))
    path = tmp_path_factory.mktemp("spec-profile") / "profile.json"
    config = json.dumps({"method": "draft_model", "model": model, "num_speculative_tokens": 3})
    result = RUNNER.invoke(app, [
        "profile", model, "--quick", "--repeats", "1", "--max-num-batched-tokens", "64", "--max-num-seqs", "8",
        "--num-kv-blocks", "64", "--engine-requests", "4", "--speculative-config", config, "-o", str(path),
    ])
    assert result.exit_code == 0, result.output
    return path, result.output


def test_profile_records_the_drafts_step_model_and_acceptance(spec_profile):
    path, output = spec_profile
    raw = json.loads(path.read_text())
    spec = raw["speculative"]
    # The target's fit also learns from the verification steps (k + 1 = 4 new tokens on cached context).
    assert any(t["source"] == "engine" and any(n == 4 and c > 0 for n, c in zip(t["shape"]["new_tokens"], t["shape"]["contexts"]))
               for t in raw["timings"]["execute"])
    assert spec["config"]["method"] == "draft_model" and spec["config"]["num_speculative_tokens"] == 3
    assert spec["per_token_acceptance"] == 1.0 and spec["acceptance_rate"] == 1.0
    assert 1.0 < spec["mean_accepted_length"] <= 4.0
    assert spec["draft_execute"]["terms"] == list(ExecuteFeatures(token_knots(64)).terms)
    assert all(c >= 0 for c in spec["draft_execute"]["coefficients"]) and any(spec["draft_execute"]["coefficients"])
    assert spec["draft_model"]["shape"]["hidden_size"] == 64 and spec["draft_scale"] > 0
    assert spec["proposal_rate"] == 1.0  # a draft model always drafts
    assert "per-token acceptance 100.0%" in output


def test_an_ngram_profile_measures_lookup_cost_and_how_often_a_lookup_matches(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("smollm"))
    config = json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    result = RUNNER.invoke(app, [
        "profile", model, "--quick", "--repeats", "1", "--warmups", "0", "--max-num-batched-tokens", "64",
        "--max-num-seqs", "8", "--num-kv-blocks", "64", "--engine-requests", "2", "--speculative-config", config,
        "-o", str(tmp_path / "p.json"),
    ])
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "p.json").read_text())["speculative"]
    assert spec["draft_execute"] is None and spec["ngram_seconds_per_token"] > 0
    assert 0.0 < spec["proposal_rate"] <= 1.0  # random prompts: single-token matches are common, not certain
    sim = _simulate(tmp_path / "p.json", tmp_path / "s", "--speculative-config", config, "--spec-acceptance", "0.5")
    assert sim.exit_code == 0 and "Speculation: acceptance rate" in sim.output


def _simulate(path, out, *extra):
    return RUNNER.invoke(app, [
        "simulate", "--profile", str(path), "--random-input-len", "24", "--random-output-len", "20", "--num-prompts",
        "6", "--max-concurrency", "2", "--result-dir", str(out), "--no-plots", *extra,
    ])


def test_simulate_speculates_with_the_profiles_acceptance_or_a_given_one(spec_profile, tmp_path):
    path, _ = spec_profile
    config = json.dumps({"method": "draft_model", "model": "any", "num_speculative_tokens": 3})
    off = _simulate(path, tmp_path / "off")
    full = _simulate(path, tmp_path / "full", "--speculative-config", config)
    none = _simulate(path, tmp_path / "none", "--speculative-config", config, "--spec-acceptance", "0")
    assert off.exit_code == full.exit_code == none.exit_code == 0, off.output + full.output + none.output
    # Below k + 1 = 4 only where max_tokens caps a request's last drafts.
    assert "acceptance rate 100.0%, mean accepted length 3.80" in " ".join(full.output.split())
    assert "acceptance rate 0.0%, mean accepted length 1.00" in " ".join(none.output.split())
    runs = {d: json.loads((tmp_path / d / "results.json").read_text())["runs"][0]["records"] for d in ("off", "full", "none")}
    assert [r["output_tokens"] for r in runs["full"]] == [r["output_tokens"] for r in runs["off"]] == [20] * 6
    assert max(max(r["chunk_tokens"]) for r in runs["full"]) == 4 and max(max(r["chunk_tokens"]) for r in runs["none"]) == 1


def test_simulate_refuses_speculation_it_cannot_model(spec_profile, tmp_path):
    path, _ = spec_profile
    alone = _simulate(path, tmp_path / "a", "--spec-acceptance", "0.5")
    assert alone.exit_code == 2 and "--spec-acceptance needs --speculative-config" in alone.output
    ngram = _simulate(path, tmp_path / "b", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}')
    assert ngram.exit_code == 2 and "method 'draft_model'" in ngram.output
    bad = _simulate(path, tmp_path / "c", "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}')
    assert bad.exit_code == 2 and "unknown method" in bad.output
