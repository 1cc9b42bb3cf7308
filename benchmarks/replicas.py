"""Data-parallel replicas: 1 replica x 2 threads vs 2 replicas x 1 thread, the three routers at 50/80/100% of
capacity, and one replica killed halfway through a run; the simulator's prediction beside each measured row."""

# Run: python benchmarks/replicas.py [--requests 120] [--seeds 3] [--output-len 32] [--slo ttft=200ms,tpot=50ms] [--out DIR]
#                                   [--prompt-len 200]
# The bundled demo model and chat workload (ShareGPT sample, outputs fixed at --output-len tokens), greedy.
# The sample's prompts are short: a new request's TTFT is the step in progress plus one short step on either
# replica, and round robin's alternation spreads bursts as well as any router (in the simulator too: p99 TTFT
# rr 11.8 / least_loaded 14.4 / slo 12.8 ms at 80%, 10 seeds). --prompt-len gives prompts a long tail, where a
# replica busy with a long prefill is worth avoiding (simulated: rr 53.3 / least_loaded 52.9 / slo 40.4 ms).
# 1x2: `sloserve serve --num-threads 2` in a subprocess (saving its calibrated step-time model on exit).
# 2x1: two Ray replicas of 1 thread behind a front served in this process (so the router can be switched between
#      runs without restarting Ray). The load generator runs in a process of its own for both systems, so neither
#      front shares its interpreter (GIL) with the client.
# Rates are fractions of the 2x1 capacity (a burst's completed requests / its duration), the same for every row.
# The simulator replays each row's workload (same seed and arrival times) with the step-time model each engine
# calibrated online during the measured runs (one engine for 1x2, replica 0's for 2x1, through the same router).
# A p99 over ~100 requests is nearly their maximum, so one stall decides it: each row is run with --seeds
# workloads (other prompts and arrivals), every system on the same ones, and the table gives the median over
# seeds (p99 TTFT with its min-max); the target line counts the seeds on which it held.

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import uvicorn

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.client import ClientConfig
from sloserve.bench.endpoint import wait_until_healthy
from sloserve.bench.metrics import summarize
from sloserve.bench.runner import play
from sloserve.bench.lengths import LengthDist
from sloserve.bench.sharegpt import ShareGPTSource
from sloserve.bench.slo import SLO
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.tokens import HFTokenizer
from sloserve.bench.workload import Workload
from sloserve.cli_args import default_model_dir
from sloserve.config import EngineConfig
from sloserve.engine.cost import StepCostModel
from sloserve.router.launch import ReplicaSettings, start_replicas, stop_replicas
from sloserve.router.policies import make_routing_policy
from sloserve.router.router import Router
from sloserve.server.admission import AdmissionLimits
from sloserve.server.app import build_app
from sloserve.server.settings import ServerSettings
from sloserve.sim.clock import VirtualClock
from sloserve.sim.profile import Profile, describe_machine
from sloserve.sim.replicas import build_sim_replicas, simulate_replicas
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate

KNOBS = dict(max_num_batched_tokens=256, max_num_seqs=32, num_kv_blocks=512)
ROUTERS = ("round_robin", "least_loaded", "slo")
LOST = {"timeout", "connection", "empty", "protocol", "other"}  # ended without a status or an error the client saw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=120, help="requests per run")
    p.add_argument("--seeds", type=int, default=3, help="workloads per row (seed, seed+1, ...); medians reported")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--loads", default="0.5,0.8,1.0")
    p.add_argument("--slo", default="ttft=200ms,tpot=50ms", help="interactive chat (DESIGN.md's default)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="instead of the ShareGPT sample's (short) prompts: random prompts of lognormal lengths with "
                        "this mean (coefficient of variation 1.5, 8-900 tokens), a long tail of prefills")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="replicas-"))
    out.mkdir(parents=True, exist_ok=True)
    model = default_model_dir()
    slo = SLO.parse(args.slo)
    tok = HFTokenizer(str(model))
    source = ShareGPTSource("", args.output_len) if args.prompt_len is None else SyntheticSource(
        LengthDist(args.prompt_len, "lognormal", 1.5, 8, 900), LengthDist(args.output_len), vocab_size=tok.vocab_size)
    loads = [float(x) for x in args.loads.split(",")]
    print(f"machine: {describe_machine()}; load average before {os.getloadavg()}")
    rows: dict[tuple[str, float], list[dict]] = {}
    seeds = [args.seed + k for k in range(args.seeds)]

    # 2 replicas x 1 thread first: its burst sets the capacity every row's rate is a fraction of.
    client = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    run_load = functools.partial(_play_apart, client)
    front = InProcessReplicas(model, args.seed)
    try:
        cfg = front.client()
        run_load(Workload(source, Arrivals("burst"), 8, seed=args.seed + 99), cfg)  # warm
        capacity_w = Workload(source, Arrivals("burst"), args.requests, seed=args.seed)
        burst = run_load(capacity_w, cfg, label="capacity")
        capacity = sum(r.success for r in burst.records) / burst.duration_s
        print(f"2x1 capacity (burst of {args.requests}): {capacity:.2f} req/s")
        runs = []
        for seed in seeds:
            for load in loads:  # routers interleaved at each load, so drifting machine load hits all alike
                for router in ROUTERS:
                    front.use(router)
                    w = Workload(source, Arrivals("poisson", load * capacity), args.requests, seed=seed)
                    runs.append((router, load, w, run_load(w, cfg, label=f"{router},{load:g}")))
        model_2x1 = front.step_model()
        for router, load, w, run in runs:
            sim = simulate_replicas(build_sim_replicas(model_2x1, front.knobs, "fcfs", 2),
                                    Router(make_routing_policy(router), 2), w.requests(tok))
            rows.setdefault((f"2x1 {router}", load), []).append(_row(run, sim, slo))
        kill = _kill_run(front, run_load, source, tok, 0.8 * capacity, args, slo)
    finally:
        front.stop()

    single = SubprocessServer(model, out / "profile-1x2.json")
    try:
        cfg = single.client()
        run_load(Workload(source, Arrivals("burst"), 8, seed=args.seed + 99), cfg)
        single_runs = []
        for seed in seeds:
            for load in loads:
                w = Workload(source, Arrivals("poisson", load * capacity), args.requests, seed=seed)
                single_runs.append((load, w, run_load(w, cfg, label=f"1x2,{load:g}")))
    finally:
        single.stop()
        client.shutdown()
    prof = Profile.load(str(out / "profile-1x2.json"))
    for load, w, run in single_runs:
        clock = VirtualClock()
        sim = simulate(build_sim_engine(prof.step_model, front.knobs, "fcfs", clock), clock, w.requests(tok))
        rows.setdefault(("1x2", load), []).append(_row(run, sim, slo))
    _print(rows, kill, capacity, args, slo)
    print(f"load average after {os.getloadavg()}")


def _play_apart(client: ProcessPoolExecutor, workload: Workload, cfg: ClientConfig, label: str = ""):
    """One run of the load generator, in the client process."""
    return client.submit(_play_here, workload, cfg, label).result()


def _play_here(workload: Workload, cfg: ClientConfig, label: str):
    return asyncio.run(play(workload, cfg, tokenizer=HFTokenizer(str(default_model_dir())), label=label))


def _row(run, sim, slo: SLO) -> dict:
    """One seed's figures, measured and simulated (p99 TTFT in ms)."""
    real = summarize(run.records, run.duration_s, (50.0, 99.0), slo)
    pred = summarize(sim.records, sim.duration_s, (50.0, 99.0), slo)
    nan = float("nan")
    return dict(goodput=real.goodput, sim_goodput=pred.goodput, attain=real.attainment, sim_attain=pred.attainment,
                p99=(real.ttft.percentiles[99.0] or nan) * 1e3, sim_p99=(pred.ttft.percentiles[99.0] or nan) * 1e3,
                failed=real.failed)


def _median(seeds: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in seeds)


def _kill_run(front: InProcessReplicas, run_load, source, tok, rate: float, args, slo: SLO) -> dict:
    """A run at `rate` with the slo router; replica 0 is killed halfway through the arrivals (Ray restarts it)."""
    front.use("slo")
    w = Workload(source, Arrivals("poisson", rate), args.requests * 2, seed=args.seed + 7)
    half = w.requests(tok)[len(w.requests(tok)) // 2].arrival_s
    killed = {}

    def kill() -> None:
        import ray

        time.sleep(half)
        killed["at"] = time.monotonic()
        ray.kill(front.replicas.actors[0], no_restart=False)
        router = front.replicas.router
        while router.loads[0].ready and time.monotonic() - killed["at"] < 30:
            time.sleep(0.005)
        killed["down_s"] = time.monotonic() - killed["at"]  # the router routes around it from here
        while not router.loads[0].ready and time.monotonic() - killed["at"] < 300:
            time.sleep(0.05)
        if router.loads[0].ready:
            killed["recovered_s"] = time.monotonic() - killed["at"]

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    run = run_load(w, front.client(timeout_s=120), label="kill")
    killer.join(timeout=300)
    records = run.records
    return dict(n=len(records), ok=sum(r.success for r in records),
                errors={k: sum(1 for r in records if r.error_kind == k) for k in {r.error_kind for r in records} - {None}},
                lost=sum(1 for r in records if r.error_kind in LOST or (r.status is None and r.error_kind is None)),
                down_s=killed.get("down_s"), recovered_s=killed.get("recovered_s"), summary=summarize(records, run.duration_s, (50.0, 99.0), slo))


def _print(rows: dict[tuple[str, float], list[dict]], kill: dict, capacity: float, args, slo: SLO) -> None:
    prompts = ("ShareGPT sample prompts" if args.prompt_len is None
               else f"random prompts, lognormal lengths of mean {args.prompt_len} (CV 1.5, 8-900)")
    print(f"\nSLO {args.slo}; {args.requests} requests a row ({prompts}, {args.output_len} output tokens), "
          f"{args.seeds} seeds from {args.seed}: medians over seeds, p99 TTFT's min-max beside it; rates as fractions "
          f"of the 2x1 capacity {capacity:.2f} req/s; sim = simulator's prediction")
    print(f"{'system':<17} {'load':>5} {'rate':>6} | {'goodput':>7} {'sim':>6} {'err':>6} | {'attain':>6} {'sim':>6} | "
          f"{'p99 TTFT ms':>11} {'min-max':>11} {'sim':>5} | {'failed':>6}")
    for (system, load), seeds in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        goodput, sim_goodput = _median(seeds, "goodput"), _median(seeds, "sim_goodput")
        err = (sim_goodput - goodput) / goodput if goodput else float("nan")
        p99s = [s["p99"] for s in seeds]
        print(f"{system:<17} {load:>5.0%} {load * capacity:>6.2f} | {goodput:>7.2f} {sim_goodput:>6.2f} {err:>+6.0%} | "
              f"{_median(seeds, 'attain'):>6.0%} {_median(seeds, 'sim_attain'):>6.0%} | {_median(seeds, 'p99'):>11.0f} "
              f"{f'{min(p99s):.0f}-{max(p99s):.0f}':>11} {_median(seeds, 'sim_p99'):>5.0f} | "
              f"{sum(s['failed'] for s in seeds):>6}")
    s = kill["summary"]
    print(f"\nkill run (slo router, 80% load, replica 0 killed halfway): {kill['n']} requests, {kill['ok']} answered in "
          f"full, errors {kill['errors'] or 0}, lost without an answer {kill['lost']}; routed around after "
          f"{_s(kill['down_s'])}, back in the router (restarted by Ray) after {_s(kill['recovered_s'])}; "
          f"goodput {s.goodput:.2f} req/s, attainment {s.attainment:.0%}")
    at80 = {system: [s["p99"] for s in seeds] for (system, load), seeds in rows.items() if load == 0.8}
    slo_, ll, rr = (at80.get(f"2x1 {r}", []) for r in ("slo", "least_loaded", "round_robin"))
    if slo_ and ll and rr:
        held = sum(a <= b and a < c for a, b, c in zip(slo_, ll, rr))
        met = statistics.median(slo_) <= statistics.median(ll) and statistics.median(slo_) < statistics.median(rr)
        print(f"target (slo p99 TTFT at 80% no worse than least_loaded, better than round_robin): median "
              f"{statistics.median(slo_):.0f} vs {statistics.median(ll):.0f} vs {statistics.median(rr):.0f} ms "
              f"({'met' if met else 'not met'}); per seed slo/least_loaded/round_robin "
              f"{', '.join(f'{a:.0f}/{b:.0f}/{c:.0f}' for a, b, c in zip(slo_, ll, rr))}: held on {held} of {len(slo_)}")


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"


class InProcessReplicas:
    """Two 1-thread replicas on a local Ray, the OpenAI front served by uvicorn on a thread of this process."""

    def __init__(self, model: Path, seed: int) -> None:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
        config = EngineConfig(model=str(model), seed=seed, **KNOBS)
        self.replicas = start_replicas(config, ReplicaSettings(2, "slo", num_threads=1))
        info = self.replicas.engine
        self.knobs = EngineKnobs(KNOBS["max_num_batched_tokens"], KNOBS["max_num_seqs"], KNOBS["num_kv_blocks"],
                                 info.max_model_len, info.config.block_size, info.vocab_size)
        settings = ServerSettings(served_model_names=[model.name], admission=AdmissionLimits(mode="none"))
        app = build_app(None, settings, self.replicas)
        sock = _socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.name = model.name
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=asyncio.run, args=(self.server.serve(sockets=[sock]),), daemon=True)
        self.thread.start()
        wait_until_healthy(self.url)

    def client(self, timeout_s: float = 600.0) -> ClientConfig:
        return ClientConfig(self.url, "/v1/completions", self.name, timeout_s=timeout_s, ignore_eos=True)

    def use(self, router: str) -> None:
        self.replicas.router.policy = make_routing_policy(router)

    def step_model(self) -> StepCostModel:
        load = self.replicas.router.loads[0]
        return StepCostModel(load.knots, list(load.coefficients))

    def stop(self) -> None:
        import ray

        self.server.should_exit = True
        self.thread.join(timeout=30)
        stop_replicas(self.replicas)
        ray.shutdown()


class SubprocessServer:
    def __init__(self, model: Path, profile_out: Path) -> None:
        sock = _socket()
        port = sock.getsockname()[1]
        sock.close()
        self.url, self.name = f"http://127.0.0.1:{port}", model.name
        knobs = [f"--{k.replace('_', '-')}={v}" for k, v in KNOBS.items()]
        self.proc = subprocess.Popen([sys.executable, "-m", "sloserve.cli", "serve", str(model), "--num-threads", "2",
                                      "--port", str(port), "--admission", "none", "--log-level", "warning",
                                      "--profile-out", str(profile_out), *knobs])
        wait_until_healthy(self.url, self.proc)

    def client(self) -> ClientConfig:
        return ClientConfig(self.url, "/v1/completions", self.name, ignore_eos=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def _socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


if __name__ == "__main__":
    main()
