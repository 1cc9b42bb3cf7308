"""Simulator vs real server: predicted and measured TTFT/TPOT percentiles at 30/60/85% of capacity, with the grid
profile and with the profile the server harvested from its own steps (`--profile-out`), and sim speed."""

# Run: python benchmarks/sim_vs_real.py [--quick] [--requests 120] [--output-len 64] [--loads 0.3,0.6,0.85]
#      [--threads 1] [--profile profile.json] [--real EARLIER_OUT] [--out DIR] [--sim-requests 10000]
# Reported run (2-core CPU, ~13 min): --threads 1 --requests 100 --output-len 32. With 2 intra-op threads the
# server (event loop + load generator on the same 2 cores) gains nothing over 1 thread while the isolated profile
# runs 1.6x faster, so a 2-thread profile under-predicts the server's latency by 40-80%: profile as you serve.
# One SmolLM2-135M-shaped model with random weights (only speed matters) is profiled with `sloserve profile`,
# served with `sloserve serve` in a subprocess and loaded with the bench runner; the simulator replays the same
# workload (same seed, same arrival times, same engine knobs) on virtual time. Both write bench results files.

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from transformers import LlamaConfig

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.client import ClientConfig
from sloserve.bench.endpoint import free_port, wait_until_healthy
from sloserve.bench.lengths import LengthDist
from sloserve.bench.metrics import summarize
from sloserve.bench.results import BenchResults, capture_environment
from sloserve.bench.runner import play
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.workload import Workload
from sloserve.sim.clock import VirtualClock
from sloserve.sim.profile import Profile, describe_machine
from sloserve.sim.results import sim_results, sim_run
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate

SMOLLM2_135M = dict(vocab_size=32000, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_theta=100000.0, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
PCTS = (50.0, 90.0, 99.0)


# The project's own command through this interpreter, so the script works without an activated venv.
SLOSERVE = [sys.executable, "-m", "sloserve.cli"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="short run: fewer requests, a smaller profile grid")
    p.add_argument("--requests", type=int, default=None, help="requests per load level (default 120; 40 with --quick)")
    p.add_argument("--loads", default="0.3,0.6,0.85", help="fractions of the measured capacity")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--capacity-requests", type=int, default=None, help="burst size for capacity (default 48; 24 quick)")
    p.add_argument("--sim-requests", type=int, default=10000, help="requests of the simulator speed run")
    p.add_argument("--profile", default=None, help="reuse this profile instead of profiling first")
    p.add_argument("--real", default=None, help="reuse the measured runs (real-*.json) of an earlier --out folder: "
                   "predict them again, e.g. with another --profile, without serving")
    p.add_argument("--out", default=None, help="folder for the profile and results files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of the profile and the server (OMP_NUM_THREADS); default 1 leaves "
                        "the second core to the server's event loop and the load generator")
    args = p.parse_args()
    n = args.requests or (40 if args.quick else 120)
    burst = args.capacity_requests or (24 if args.quick else 48)
    out = Path(args.out or tempfile.mkdtemp(prefix="sim_vs_real-"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "smollm2-135m-dummy"
    LlamaConfig(**SMOLLM2_135M).save_pretrained(model_dir)
    save_word_tokenizer(model_dir, SMOLLM2_135M["vocab_size"])
    knobs_args = ["--load-format", "dummy", "--max-num-batched-tokens", "512", "--max-num-seqs", "64"]

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    print(f"machine: {describe_machine()}; torch threads of profile and server: {args.threads}; "
          f"load average {os.getloadavg()}")
    profile_path = args.profile or str(Path(args.real or out) / "profile.json")
    if args.profile is None and args.real is None:
        cmd = [*SLOSERVE, "profile", str(model_dir), *knobs_args, "-o", profile_path] + (["--quick"] if args.quick else [])
        print("$ " + " ".join(cmd))
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"profiled in {time.perf_counter() - t:.0f} s")
    prof = Profile.load(profile_path)
    e = prof.engine
    knobs = EngineKnobs(e["max_num_batched_tokens"], e["max_num_seqs"], e["num_kv_blocks"], e["max_model_len"],
                        e["block_size"], e["vocab_size"])
    for name, fit in (("execute", prof.execute), ("overhead", prof.overhead)):
        print(f"fit {name}: held-out |rel err| mean {fit.heldout.mean:.1%} median {fit.heldout.median:.1%} "
              f"(n={fit.heldout.count}); train median {fit.train.median:.1%}")

    source = SyntheticSource(LengthDist(args.input_len, "uniform", args.range_ratio),
                             LengthDist(args.output_len, "uniform", args.range_ratio), vocab_size=e["vocab_size"])
    if args.real:
        rows = [_row(label, real.runs[0].rate if label != "burst" else 0.0, Workload.from_dict(real.config["workload"]),
                     (real.runs[0], real.config.get("server_metrics", {})), prof, knobs)
                for label, real in _load_real(Path(args.real))]
    else:
        rows = _measure(args, out, model_dir, knobs_args, env, source, prof, knobs, n, burst)
    for label, _, w, (real_run, server_side), (sim_run_, sim_outcome) in rows:
        _save(out, label, w, real_run, server_side, sim_run_, sim_outcome, prof, profile_path, knobs)
    print(f"\npredicted with the grid profile ({profile_path})")
    _print_table(rows)
    # The server's own online-calibrated model, saved at shutdown (`serve --profile-out`): the same runs predicted again.
    harvested_path = Path(args.real or out) / "harvested-profile.json"
    if harvested_path.exists():
        harvested = Profile.load(str(harvested_path))
        err = harvested.execute.heldout
        print(f"\npredicted with the profile harvested from the server ({harvested_path}): its step-time model after "
              f"{harvested.settings.get('steps_observed')} measured steps, {harvested.settings.get('refits')} refits; "
              f"prequential step error median {err.median:.1%}, mean {err.mean:.1%}")
        _print_table([_row(label, rate, w, real, harvested, knobs) for label, rate, w, real, _ in rows])
    _sim_speed(prof, knobs, rows[-1][2].source, rows[-1][1], args.sim_requests, args.seed)
    print(f"results: {out} (render any with `sloserve bench report FILE`)")


def _measure(args, out: Path, model_dir: Path, knobs_args, env, source, prof: Profile, knobs: EngineKnobs, n: int, burst: int):
    """Serve the model, measure its capacity with a burst, then each load level; predict each the same way."""
    port = args.port or free_port()
    server = subprocess.Popen([*SLOSERVE, "serve", str(model_dir), *knobs_args, "--port", str(port),
                               "--log-level", "warning", "--profile-out", str(out / "harvested-profile.json")], env=env)
    base = f"http://127.0.0.1:{port}"
    cfg = ClientConfig(base, "/v1/completions", model_dir.name, temperature=0.0, ignore_eos=True)
    rows = []
    try:
        wait_until_healthy(base, server)
        asyncio.run(play(Workload(source, Arrivals("burst"), 8, seed=args.seed + 99), cfg))  # warm the server
        capacity_w = Workload(source, Arrivals("burst"), burst, seed=args.seed)
        real = _real(capacity_w, cfg, base, "capacity")
        capacity = len(real[0].records) / real[0].duration_s
        rows.append(_row("burst", capacity, capacity_w, real, prof, knobs))
        print(f"capacity (burst of {burst}): measured {capacity:.3g} req/s, predicted "
              f"{burst / rows[-1][4][0].duration_s:.3g} req/s")
        for i, load in enumerate(float(x) for x in args.loads.split(",")):
            # Fresh prompts per run: the server's prefix cache would answer a repeated prompt set from cache.
            w = Workload(source, Arrivals("poisson", load * capacity), n, seed=args.seed + 1 + i)
            rows.append(_row(f"{load:.0%}", load * capacity, w, _real(w, cfg, base, f"load={load:g}"), prof, knobs))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


def _row(label: str, rate: float, w: Workload, real, prof: Profile, knobs: EngineKnobs):
    return label, rate, w, real, _sim(prof, knobs, w, f"{label},simulated")


def _load_real(folder: Path):
    labels = ["burst"] + sorted(p.stem.removeprefix("real-") for p in folder.glob("real-*pct.json"))
    return [(label.replace("pct", "%"), BenchResults.load(str(folder / f"real-{label}.json"))) for label in labels]


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """One plain word per id, no special tokens: the server streams text for every token (the bench counts
    only chunks with text), and detokenizing costs the engine what a real tokenizer would, roughly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(path)


def _real(w: Workload, cfg: ClientConfig, base: str, label: str):
    before = _scrape(base)
    run = asyncio.run(play(w, cfg, label=label))
    after = _scrape(base)
    engine_side = {k: (after[k][0] - before[k][0]) / max(1, after[k][1] - before[k][1]) for k in after}
    bad = [r for r in run.records if not r.success]
    if bad:
        print(f"  {label}: {len(bad)} requests failed, e.g. {bad[0].error_kind}: {bad[0].error}")
    return run, engine_side


def _sim(prof: Profile, knobs: EngineKnobs, w: Workload, label: str):
    clock = VirtualClock()
    engine = build_sim_engine(prof.step_model, knobs, "fcfs", clock,
                              seconds_per_waiting=prof.rank_seconds_per_waiting.get("fcfs", 0.0))
    outcome = simulate(engine, clock, w.requests(), max_concurrency=w.max_concurrency, duration_s=w.duration_s)
    return sim_run(outcome, w, label), outcome


def _scrape(base: str) -> dict[str, tuple[float, float]]:
    """Engine-side (server) latency sums and counts from /metrics: TTFT and TPOT without HTTP in them."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out = {}
    for name in ("time_to_first_token_seconds", "request_time_per_output_token_seconds"):
        s = re.search(rf"^sloserve:{name}_sum\{{.*?\}} (\S+)$", text, re.M)
        c = re.search(rf"^sloserve:{name}_count\{{.*?\}} (\S+)$", text, re.M)
        out[name] = (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)
    return out


def _print_table(rows) -> None:
    print(f"\n{'load':>6} {'rate':>7} {'metric':>6} {'pct':>4} {'measured ms':>12} {'predicted ms':>13} {'rel err':>8}")
    errors: dict[str, list[float]] = {"TTFT": [], "TPOT": []}
    for label, rate, _, (real_run, engine_side), (sim_run_, _) in rows:
        real_s = summarize(real_run.records, real_run.duration_s, PCTS)
        sim_s = summarize(sim_run_.records, sim_run_.duration_s, PCTS)
        for metric, key in (("TTFT", "ttft"), ("TPOT", "tpot")):
            for pct in PCTS:
                m, pr = getattr(real_s, key).percentiles[pct], getattr(sim_s, key).percentiles[pct]
                if m is None or pr is None:
                    print(f"{label:>6} {rate:7.3g} {metric:>6} p{pct:<3g}  no successful requests")
                    continue
                rel = (pr - m) / m
                if label != "burst":
                    errors[metric].append(abs(rel))
                print(f"{label:>6} {rate:7.3g} {metric:>6} p{pct:<3g} {m * 1e3:12.1f} {pr * 1e3:13.1f} {rel:+8.1%}")
        ttft_e, tpot_e = (engine_side.get(k, float("nan")) for k in ("time_to_first_token_seconds",
                                                                       "request_time_per_output_token_seconds"))
        print(f"{'':>6} {'':>7} means: TTFT client {real_s.ttft.mean * 1e3:.1f} / server {ttft_e * 1e3:.1f} / "
              f"sim {sim_s.ttft.mean * 1e3:.1f} ms; TPOT client {real_s.tpot.mean * 1e3:.2f} / server "
              f"{tpot_e * 1e3:.2f} / sim {sim_s.tpot.mean * 1e3:.2f} ms")
    for metric, errs in errors.items():  # targets: the predictor's error <= 5% median, <= 15% at the worst point
        if not errs:
            continue
        med, worst = statistics.median(errs), max(errs)
        print(f"|rel err| {metric} over loads x p50/p90/p99: median {med:.1%} (target <= 5%: "
              f"{'met' if med <= 0.05 else 'not met'}), worst {worst:.1%} (target <= 15%: "
              f"{'met' if worst <= 0.15 else 'not met'}), min {min(errs):.1%}")


def _sim_speed(prof: Profile, knobs: EngineKnobs, source, rate: float, num: int, seed: int) -> None:
    w = Workload(source, Arrivals("poisson", rate), num, seed=seed)
    specs = w.requests()
    clock = VirtualClock()
    engine = build_sim_engine(prof.step_model, knobs, "fcfs", clock,
                              seconds_per_waiting=prof.rank_seconds_per_waiting.get("fcfs", 0.0))
    start = time.perf_counter()
    outcome = simulate(engine, clock, specs)
    wall = time.perf_counter() - start
    print(f"simulating {num} requests at {rate:.3g} req/s: {wall:.2f} s wall for {outcome.duration_s:.0f} s simulated "
          f"({outcome.num_steps} steps), {outcome.duration_s / wall:.0f}x faster than real time")


def _save(out: Path, label: str, w: Workload, real_run, server_side: dict, sim_run_, outcome, prof, profile_path,
          knobs) -> None:
    safe = label.replace("%", "pct")
    real = BenchResults({"workload": w.to_dict(), "percentiles": list(PCTS), "slo": None, "command": sys.argv,
                         "server_metrics": server_side}, capture_environment(), [real_run], None, "client", time.time())
    real.save(str(out / f"real-{safe}.json"))
    sim = sim_results([sim_run_], w, prof, profile_path, knobs, "fcfs", None, PCTS, sys.argv, [outcome])
    sim.save(str(out / f"sim-{safe}.json"))


if __name__ == "__main__":
    main()
