"""Where a request's time to first token goes: one engine in the front's process (1x2) vs two Ray replicas (2x1),
stage by stage, from timestamps taken on one machine-wide monotonic clock in every process."""

# Run: python benchmarks/ray_path.py [--requests 40] [--gap-ms 150] [--max-tokens 8]
# Requests are sent one at a time (a gap between them), so nothing queues: what is left is the path's floor.
# Stages (all perf_counter = CLOCK_MONOTONIC, shared by the processes of one Linux machine):
#   send -> front: HTTP, parsing, tokenizing, up to the engine/ReplicaSet add_request call
#   front -> replica: the Ray call until the replica's generate() runs (2x1 only)
#   replica/front -> step start: the request's first scheduled step begins
#   step start -> token: the first step's length (the token is stamped when the step ends)
#   token -> yield: the replica's generator yields it (2x1 only)
#   yield -> front put: through Ray's streaming generator into the front's RequestStream (2x1 only)
#   put -> client: SSE chunk written and read
# The two systems alternate request by request, so drifting machine load hits both alike.

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from sloserve.cli_args import default_model_dir
from sloserve.config import EngineConfig
from sloserve.engine import async_engine
from sloserve.llm import build_engine
from sloserve.router.launch import ReplicaSettings, start_replicas, stop_replicas
from sloserve.router.replica import EngineReplica
from sloserve.router.replica_set import ReplicaSet
from sloserve.server.admission import AdmissionLimits
from sloserve.server.app import build_app
from sloserve.server.settings import ServerSettings
from sloserve.sim.profile import describe_machine

KNOBS = dict(max_num_batched_tokens=256, max_num_seqs=32, num_kv_blocks=512)
STAMPS: dict[str, dict[str, float]] = {}  # request id -> stage -> time, in this (the front's) process


class TimedReplica(EngineReplica):
    """The replica, stamping when add() starts and when its output stream yields a request's first token."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stamps: dict[str, dict[str, float]] = {}

    async def add(self, request_id, *args, **kwargs):
        self.stamps.setdefault(request_id, {})["replica"] = time.perf_counter()
        return await super().add(request_id, *args, **kwargs)

    async def outputs(self):
        async for batch in super().outputs():
            now = time.perf_counter()
            for u in batch.updates:
                mine = self.stamps.setdefault(u.request_id, {})
                if u.output is not None and u.output.num_tokens and "yield" not in mine:
                    mine["yield"] = now
            yield batch

    async def take_stamps(self) -> dict:
        stamps, self.stamps = self.stamps, {}
        return stamps


def _instrument() -> None:
    """Stamp the front's add_request entry and the first token put into a request's stream (this process only)."""
    put = async_engine.RequestStream.put

    def timed_put(stream, item):
        mine = STAMPS.setdefault(stream.request_id, {})
        if item.num_tokens and "put" not in mine:
            mine["put"] = time.perf_counter()
            out = item.output
            mine["sched"], mine["token"] = out.first_scheduled_time, out.outputs[0].token_times[0]
        put(stream, item)

    async_engine.RequestStream.put = timed_put
    for cls in (async_engine.AsyncLLMEngine, ReplicaSet):
        add = cls.add_request

        def timed_add(self, request_id, *args, _add=add, **kwargs):
            STAMPS.setdefault(request_id, {})["front"] = time.perf_counter()
            return _add(self, request_id, *args, **kwargs)

        cls.add_request = timed_add


class Served:
    def __init__(self, engine, replicas, name: str) -> None:
        settings = ServerSettings(served_model_names=[name], admission=AdmissionLimits(mode="none"))
        self.server = uvicorn.Server(uvicorn.Config(build_app(engine, settings, replicas), port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1/completions"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def one_request(client: httpx.Client, url: str, name: str, max_tokens: int) -> dict[str, float]:
    body = {"model": name, "prompt": "Shall I compare thee to a summer's day?", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    first = None
    with client.stream("POST", url, json=body) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    return {"send": sent, "client": first}


def _one_at_a_time(served: dict, replicas, args, name: str, per: dict) -> None:
    import ray

    with httpx.Client(timeout=60) as client:
        for k in range(args.requests + 4):  # the first 4 of each are warm-up
            for system, s in served.items():
                before = set(STAMPS)
                stamps = one_request(client, s.url, name, args.max_tokens)
                (rid,) = set(STAMPS) - before
                if system == "2x1":
                    for actor in replicas.actors:
                        stamps |= ray.get(actor.take_stamps.remote()).get(rid, {})
                if k >= 4:
                    per[system].append(_stages(STAMPS[rid] | stamps))
                time.sleep(args.gap_ms / 1e3)


def _play(url: str, name: str, rate: float, n: int, seed: int):
    from sloserve.bench.arrivals import Arrivals
    from sloserve.bench.client import ClientConfig
    from sloserve.bench.runner import play
    from sloserve.bench.sharegpt import ShareGPTSource
    from sloserve.bench.tokens import HFTokenizer
    from sloserve.bench.workload import Workload

    cfg = ClientConfig(url.removesuffix("/v1/completions"), "/v1/completions", name, ignore_eos=True)
    w = Workload(ShareGPTSource("", 32), Arrivals("poisson", rate), n, seed=seed)
    run = asyncio.run(play(w, cfg, tokenizer=HFTokenizer(str(default_model_dir()))))
    return sorted(r.token_times_s[0] - r.send_s for r in run.records if r.token_times_s)


def _under_load(served: dict, replicas, args, name: str, per: dict) -> None:
    """Each system in turn under the same Poisson workload (3 rounds); every request's server-side stages."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import ray

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if args.client_process else None
    ttfts: dict[str, list[float]] = {k: [] for k in served}
    for s in served.values():  # warm-up: first steps, first Ray calls, connections
        pool.submit(_play, s.url, name, args.rate, 20, 99).result() if pool else _play(s.url, name, args.rate, 20, 99)
    for seed in range(3):
        for system, s in served.items():
            before = set(STAMPS)
            call = (s.url, name, args.rate, args.requests, seed)
            ttfts[system] += pool.submit(_play, *call).result() if pool else _play(*call)
            remote: dict = {}
            if system == "2x1":
                for actor in replicas.actors:
                    remote |= ray.get(actor.take_stamps.remote())
            for rid in set(STAMPS) - before:
                stamps = STAMPS[rid] | remote.get(rid, {})
                if "put" in stamps:
                    per[system].append(_stages(stamps))
    if pool:
        pool.shutdown()
    for system, xs in ttfts.items():
        xs.sort()
        print(f"{system} client TTFT ms: p50 {xs[len(xs) // 2] * 1e3:.1f} p99 {xs[round(0.99 * (len(xs) - 1))] * 1e3:.1f}")


def _stages(s: dict) -> dict[str, float]:
    out = {"send->front": s["front"] - s["send"]} if "send" in s else {}
    if "replica" in s:
        out |= {"front->replica": s["replica"] - s["front"], "replica->step": s["sched"] - s["replica"],
                "step->token": s["token"] - s["sched"], "token->yield": s["yield"] - s["token"],
                "yield->put": s["put"] - s["yield"]}
    else:
        out |= {"front->step": s["sched"] - s["front"], "step->token": s["token"] - s["sched"],
                "token->put": s["put"] - s["token"]}
    if "send" not in s:
        return out | {"front->put": s["put"] - s["front"]}
    return out | {"put->client": s["client"] - s["put"], "TTFT": s["client"] - s["send"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=40, help="per system")
    p.add_argument("--gap-ms", type=float, default=150.0)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.0,
                   help="instead of one at a time: Poisson arrivals at this rate (req/s), 32-token outputs, the "
                        "ShareGPT sample; server-side stages only (ids are the server's)")
    p.add_argument("--client-process", action="store_true", help="with --rate: the load generator in its own process")
    args = p.parse_args()
    import ray

    model = default_model_dir()
    print(f"machine: {describe_machine()}; load average before {os.getloadavg()}")
    _instrument()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    config = EngineConfig(model=str(model), seed=0, **KNOBS)
    replicas = start_replicas(config, ReplicaSettings(2, "round_robin", num_threads=1), actor_class=TimedReplica)
    torch.set_num_threads(2)
    served = {"1x2": Served(build_engine(config), None, model.name), "2x1": Served(None, replicas, model.name)}
    per: dict[str, list[dict]] = {k: [] for k in served}
    try:
        if args.rate:
            _under_load(served, replicas, args, model.name, per)
        else:
            _one_at_a_time(served, replicas, args, model.name, per)
    finally:
        for s in served.values():
            s.stop()
        stop_replicas(replicas)
    how = (f"Poisson {args.rate:g} req/s, 32 tokens, client {'in its own process' if args.client_process else 'in the front process'}"
           if args.rate else f"one at a time ({args.gap_ms:g} ms apart), {args.max_tokens} tokens")
    print(f"\n{args.requests} requests per system, {how}; ms: median / p90 / p99 / max")
    for system, rows in per.items():
        print(f"{system}:")
        for stage in rows[0]:
            xs = sorted(r[stage] * 1e3 for r in rows)
            pct = [xs[round(q * (len(xs) - 1))] for q in (0.5, 0.9, 0.99, 1.0)]
            print(f"  {stage:<15} " + " ".join(f"{x:7.2f}" for x in pct))
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
