"""`sloserve profile --quick` on a tiny model, `sloserve simulate`, and `sloserve bench report` on its output."""
import json

from typer.testing import CliRunner

from sloserve.bench.results import BenchResults
from sloserve.cli import app
from sloserve.engine.features import OVERHEAD_TERMS, ExecuteFeatures, token_knots
from sloserve.sim.profile import Profile

RUNNER = CliRunner()


def test_profile_quick_writes_a_valid_profile(tiny_profile):
    path, output = tiny_profile
    raw = json.loads(path.read_text())
    assert raw["schema"] == "sloserve.sim.profile" and raw["version"] == 1
    assert {"cpu", "cores", "torch"} <= raw["machine"].keys()
    assert raw["model"]["shape"]["hidden_size"] == 64 and raw["model"]["dtype"] == "float32"
    engine = raw["engine"]
    assert engine["block_size"] == 16 and engine["max_num_batched_tokens"] == 64 and engine["num_kv_blocks"] == 64
    # 2 (k, v) x 2 layers x 16 slots x 2 KV heads x 16 dims x 4 bytes
    assert engine["kv_bytes_per_block"] == 2 * 2 * 16 * 2 * 16 * 4
    assert engine["vocab_size"] == 384 and engine["max_model_len"] == 256
    fit = raw["fit"]
    assert fit["token_knots"] == [1, 2, 3, 4, 8, 16, 32, 64]
    assert fit["execute"]["terms"] == list(ExecuteFeatures(token_knots(64)).terms)
    assert fit["overhead"]["terms"] == list(OVERHEAD_TERMS)
    assert all(c >= 0 for c in fit["execute"]["coefficients"] + fit["overhead"]["coefficients"])
    assert fit["execute"]["heldout_error"]["count"] > 0 and "median_abs_rel" in fit["execute"]["heldout_error"]
    sources = {t["source"] for t in raw["timings"]["execute"]}
    assert sources == {"grid", "engine"}  # constructed plans and a real engine run
    assert all(t["seconds"] > 0 for t in raw["timings"]["overhead"])
    assert "held-out" in output
    assert Profile.load(str(path)).step_seconds(Profile.load(str(path)).execute_timings[0].shape) > 0


def simulate(profile_path, out, *extra):
    return RUNNER.invoke(app, [
        "simulate", "--profile", str(profile_path), "--random-input-len", "24", "--random-output-len", "6",
        "--random-range-ratio", "0.5", "--num-prompts", "40", "--request-rate", "50", "--slo", "ttft=200ms,tpot=50ms",
        "--result-dir", str(out), "--no-plots", *extra,
    ])


def test_simulate_writes_a_bench_report_and_a_fixed_seed_repeats_it(tiny_profile, tmp_path):
    path, _ = tiny_profile
    first = simulate(path, tmp_path / "a", "--seed", "3")
    assert first.exit_code == 0, first.output
    again = simulate(path, tmp_path / "b", "--seed", "3")
    other = simulate(path, tmp_path / "c", "--seed", "4")
    assert again.exit_code == 0 and other.exit_code == 0, again.output + other.output
    a, b, c = (json.loads((tmp_path / d / "results.json").read_text()) for d in "abc")
    assert a["source"] == "simulator" and a["config"]["simulated"] and a["environment"]["simulated"]
    assert a["runs"] == b["runs"]  # records, token times and all
    assert (tmp_path / "a" / "summary.csv").read_text() == (tmp_path / "b" / "summary.csv").read_text()
    assert a["runs"] != c["runs"]
    records = BenchResults.load(str(tmp_path / "a" / "results.json")).runs[0].records
    assert len(records) == 40 and all(r.success and r.output_tokens == r.max_tokens for r in records)
    assert all(r.send_s == r.arrival_s for r in records)  # open loop: sent on arrival

    report = RUNNER.invoke(app, ["bench", "report", str(tmp_path / "a" / "results.json"), "--no-plots"])
    assert report.exit_code == 0, report.output
    assert "(simulated)" in report.output and "TTFT" in report.output and "SLO attainment" in report.output


def test_simulate_takes_engine_knobs_and_rejects_bad_ones(tiny_profile, tmp_path):
    path, _ = tiny_profile
    small = simulate(path, tmp_path / "s", "--max-num-seqs", "1", "--policy", "priority")
    assert small.exit_code == 0, small.output
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert saved["config"]["simulator"]["engine"]["max_num_seqs"] == 1
    assert saved["config"]["simulator"]["policy"] == "priority"
    bad = simulate(path, tmp_path / "x", "--policy", "lottery")
    assert bad.exit_code == 2 and "unknown policy" in bad.output
    beyond = simulate(path, tmp_path / "y", "--max-num-seqs", "512")
    assert beyond.exit_code == 0 and "extrapolates" in beyond.output


def test_simulate_with_an_slo_class_and_admission_refuses_requests_predicted_late(tiny_profile, tmp_path):
    path, _ = tiny_profile
    args = ["--policy", "slo", "--slo-class", "chat=ttft:0.001ms,tpot:50ms", "--default-slo-class", "chat"]
    refused = simulate(path, tmp_path / "r", *args, "--admission", "slo")
    served = simulate(path, tmp_path / "s", *args)
    assert refused.exit_code == 0 and served.exit_code == 0, refused.output + served.output
    records = BenchResults.load(str(tmp_path / "r" / "results.json")).runs[0].records
    statuses = {r.status for r in records}
    assert statuses == {429} and all("over its TTFT objective" in r.error for r in records)  # no step takes 1 us
    assert all(r.success for r in BenchResults.load(str(tmp_path / "s" / "results.json")).runs[0].records)
    bad = simulate(path, tmp_path / "x", "--admission", "queue")
    assert bad.exit_code == 2 and "--admission must be none or slo" in bad.output


def test_simulate_two_replicas_behind_the_slo_router(tiny_profile, tmp_path):
    path, _ = tiny_profile
    one = simulate(path, tmp_path / "one", "--request-rate", "inf")
    two = simulate(path, tmp_path / "two", "--request-rate", "inf", "--data-parallel-size", "2", "--router", "slo")
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    runs = [BenchResults.load(str(tmp_path / d / "results.json")).runs[0] for d in ("one", "two")]
    assert all(len(r.records) == 40 and all(rec.success for rec in r.records) for r in runs)
    assert runs[1].duration_s < runs[0].duration_s  # twice the engines drain the same arrivals sooner
    bad = simulate(path, tmp_path / "bad", "--data-parallel-size", "2", "--router", "random")
    assert bad.exit_code == 2 and "unknown router" in bad.output
