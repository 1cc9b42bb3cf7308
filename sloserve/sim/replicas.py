"""Simulating N replicas behind the router: each a simulated LLMEngine, all on one virtual timeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

from sloserve.bench.records import RequestRecord
from sloserve.bench.workload import RequestSpec
from sloserve.engine.cost import StepCostModel
from sloserve.engine.engine import LLMEngine
from sloserve.request import SLO, SamplingParams
from sloserve.router.load import ReplicaLoad
from sloserve.router.policies import make_routing_policy
from sloserve.router.router import Router
from sloserve.sim.clock import VirtualClock
from sloserve.sim.simulate import EngineKnobs, SimOutcome, build_sim_engine, prompt_token_ids
from sloserve.sim.speculation import SimSpeculation


@dataclass(slots=True)
class SimReplica:
    engine: LLMEngine
    clock: VirtualClock  # its own: it runs ahead to the end of its step while the others catch up
    num_received: int = 0
    routed: list[int] = field(default_factory=list)  # spec indices, in the order routed here


def build_sim_replicas(model: StepCostModel, knobs: EngineKnobs, policy: str, n: int, rank_seconds: float = 0.0,
                       speculation: SimSpeculation | None = None) -> list[SimReplica]:
    replicas = []
    for _ in range(n):
        clock = VirtualClock()
        engine = build_sim_engine(model, knobs, policy, clock, seconds_per_waiting=rank_seconds, speculation=speculation)
        replicas.append(SimReplica(engine, clock))
    return replicas


def run_replicas(model: StepCostModel, knobs: EngineKnobs, policy: str, n: int, router: str, specs: list[RequestSpec], *,
                 slo: Callable[[RequestSpec], SLO | None] | None = None, admission: bool = False,
                 rank_seconds: float = 0.0, speculation: SimSpeculation | None = None) -> SimOutcome:
    """`sloserve simulate --data-parallel-size N --router R`: N replicas of the engine behind the named router."""
    return simulate_replicas(build_sim_replicas(model, knobs, policy, n, rank_seconds, speculation),
                             Router(make_routing_policy(router), n, admission=admission), specs, slo=slo)


def simulate_replicas(replicas: list[SimReplica], router: Router, specs: list[RequestSpec], *,
                      slo: Callable[[RequestSpec], SLO | None] | None = None) -> SimOutcome:
    """Events in time order: each arrival is routed on the replicas' state at that moment, each replica
    starts its next step when its last one ends. A replica's report is read fresh at every arrival, with
    the rest of the step its clock is ahead by (the live server's reports are up to a poll interval old;
    the router counts what it sent since and takes the report's age off the step in progress).
    """
    pending = sorted(specs, key=lambda s: s.arrival_s)
    live: dict[str, RequestRecord] = {}
    records: list[RequestRecord] = []
    vocab = replicas[0].engine.vocab_size
    now, next_spec = 0.0, 0
    while True:
        busy = [(r.clock.now(), i) for i, r in enumerate(replicas) if r.engine.has_unfinished_requests()]
        step_at, stepping = min(busy, default=(None, None))
        if next_spec < len(pending) and (step_at is None or pending[next_spec].arrival_s <= max(step_at, now)):
            spec = pending[next_spec]
            next_spec += 1
            now = max(now, spec.arrival_s)
            _arrive(replicas, router, spec, now, vocab, slo(spec) if slo else None, live, records)
            continue
        if step_at is None:
            break
        replica = replicas[stepping]
        replica.clock.advance_to(now)  # idle until now: its step starts no earlier than the last event
        steps = replica.engine.executor.num_steps
        outputs = replica.engine.step()
        if replica.engine.executor.num_steps == steps:
            raise RuntimeError("the scheduler planned nothing while requests wait: the simulation cannot advance")
        for out in outputs:
            if out.finished:
                record = live.pop(out.request_id)
                completion = out.outputs[0]
                record.token_times_s = list(completion.token_times)
                record.chunk_tokens = [1] * len(completion.token_times)
                record.output_tokens = len(completion.token_ids)
                record.end_s, record.status, record.finish_reason = out.finished_time, 200, completion.finish_reason
                records.append(record)
        now = max(now, step_at)
    records.sort(key=lambda r: r.index)
    end = max((r.end_s for r in records if r.end_s is not None), default=0.0)
    executors = [r.engine.executor for r in replicas]
    return SimOutcome(records, end, sum(e.num_steps for e in executors), sum(e.busy_seconds for e in executors))


def _arrive(replicas: list[SimReplica], router: Router, spec: RequestSpec, now: float, vocab: int, request_slo: SLO | None,
            live: dict[str, RequestRecord], records: list[RequestRecord]) -> None:
    for i, r in enumerate(replicas):  # a replica's clock ahead of `now` is a step still running
        router.update(ReplicaLoad.of_engine(i, r.engine, r.num_received, max(0.0, r.clock.now() - now)), now)
    prompt = prompt_token_ids(spec, vocab)
    record = RequestRecord(spec.index, spec.arrival_s, spec.arrival_s, spec.prompt_len, spec.output_len,
                           prompt_tokens=len(prompt), output_tokens_source="usage")
    params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
    route = router.route(prompt, request_slo, params=params, now=now)
    if route.replica is None:
        record.status, record.error_kind, record.error, record.end_s = 429, "http_429", route.reject, now
        records.append(record)
        return
    replica = replicas[route.replica]
    replica.num_received += 1
    replica.routed.append(spec.index)
    if not replica.engine.has_unfinished_requests():
        replica.clock.advance_to(now)
    try:
        replica.engine.add_request(str(spec.index), prompt, params, arrival_time=spec.arrival_s, slo=request_slo)
    except ValueError as error:  # what the server answers with a 400
        record.status, record.error_kind, record.error, record.end_s = 400, "http_400", str(error), now
        records.append(record)
        return
    live[str(spec.index)] = record
