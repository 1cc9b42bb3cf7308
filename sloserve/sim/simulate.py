"""The simulation driver: plays a workload into a simulated LLMEngine on virtual time and records every token."""
from __future__ import annotations

import heapq
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sloserve.bench.records import RequestRecord
from sloserve.bench.workload import RequestSpec
from sloserve.engine.admission import LoadSnapshot, TTFTAdmission
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.engine.engine import LLMEngine
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SLO, Request, SamplingParams
from sloserve.sim.clock import VirtualClock
from sloserve.sim.executor import SimulatedExecutor

if TYPE_CHECKING:
    from sloserve.sim.speculation import SimSpeculation


@dataclass(slots=True)
class EngineKnobs:
    """The engine settings a simulation varies (the same knobs as `sloserve serve`)."""

    max_num_batched_tokens: int
    max_num_seqs: int
    num_kv_blocks: int
    max_model_len: int
    block_size: int
    vocab_size: int
    enable_prefix_caching: bool = True

    def scheduler_config(self, policy: str = "fcfs") -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.block_size, policy,
                               self.enable_prefix_caching)


@dataclass(slots=True)
class SimOutcome:
    records: list[RequestRecord]
    duration_s: float  # t=0 to the end of the last request, as the bench runner measures it
    num_steps: int
    busy_s: float  # virtual time spent in steps (the rest is idle)
    first_scheduled: list[int] = field(default_factory=list)  # spec indices in the order the scheduler first ran them


def prompt_token_ids(spec: RequestSpec, vocab_size: int) -> list[int]:
    """The ids the simulated engine sees: the spec's own, or stand-ins derived from its text.

    The prefix cache addresses blocks by content, so stand-ins must differ where texts differ and
    agree where they agree (a shared system prompt): the i-th id hashes the i-th word (cycling
    with a round number when the text has fewer words than the spec's token count).
    """
    if isinstance(spec.prompt, list):
        return [t % vocab_size for t in spec.prompt]
    words = spec.prompt.split() or [""]
    return [zlib.crc32(f"{i // len(words)}:{words[i % len(words)]}".encode()) % vocab_size
            for i in range(max(1, spec.prompt_len))]


def arrivals(token_times: list[float]) -> tuple[list[float], list[int]]:
    """Per-token times as the client sees them: tokens of one step (accepted drafts) arrive as one chunk."""
    times: list[float] = []
    counts: list[int] = []
    for t in token_times:
        if times and t == times[-1]:
            counts[-1] += 1
        else:
            times.append(t)
            counts.append(1)
    return times, counts


def build_sim_engine(model: StepCostModel, knobs: EngineKnobs, policy: str, clock: VirtualClock, *,
                     seconds_per_waiting: float = 0.0, speculation: SimSpeculation | None = None,
                     machine: StepCostModel | None = None) -> LLMEngine:
    """The real LLMEngine (Scheduler, BlockManager, policy) over a SimulatedExecutor on a virtual clock.

    The executor's step times and the engine's predictor are the same model, so policies and
    admission predict the simulated world exactly; it is not recalibrated (it is the ground truth here).
    `seconds_per_waiting`: the policy's ranking cost per waiting request a step (Profile.rank_seconds_per_waiting),
    charged on top, as the real engine pays it.
    `machine`: step times that differ from the profile (a machine slower than when it was profiled); the
    executor takes them, and the engine's predictor starts from `model` and calibrates online, as a server's does.
    """
    predictor = StepPredictor(model, calibrate=machine is not None)
    steps = predictor if machine is None else StepPredictor(machine, calibrate=False)
    if speculation is None:
        executor = SimulatedExecutor(steps, clock, knobs.num_kv_blocks, seconds_per_waiting=seconds_per_waiting)
        speculator = None
    else:
        executor = speculation.executor(steps, clock, knobs.num_kv_blocks, seconds_per_waiting)
        speculator = speculation.speculator(clock, knobs.max_model_len)
    return LLMEngine(
        executor, knobs.scheduler_config(policy), max_model_len=knobs.max_model_len, vocab_size=knobs.vocab_size,
        clock=clock, predictor=predictor, speculator=speculator,
    )


def simulate(engine: LLMEngine, clock: VirtualClock, specs: list[RequestSpec], *, max_concurrency: int | None = None,
             duration_s: float | None = None, priority: Callable[[RequestSpec], int] | None = None,
             slo: Callable[[RequestSpec], SLO | None] | None = None, admission: bool = False) -> SimOutcome:
    """Send each spec at its arrival (or when a --max-concurrency slot frees), step until all are done.

    Requests arriving during a step join after it, as with the server's step loop, but keep their
    arrival time; with nothing to run, the clock jumps to the next arrival. With `admission`, a
    request predicted to miss its TTFT objective is refused as the server's `--admission slo`
    does (recorded as a 429).
    """
    gate = TTFTAdmission(engine.predictor, engine.config.policy, engine.config.max_num_batched_tokens) if admission else None
    pending = deque(sorted(specs, key=lambda s: s.arrival_s))
    queued: deque[RequestSpec] = deque()
    # When each free --max-concurrency slot became free; requests take the earliest (FIFO, as a semaphore).
    free_slots = [0.0] * max_concurrency if max_concurrency else None
    live: dict[str, RequestRecord] = {}
    records: list[RequestRecord] = []
    vocab = engine.vocab_size
    executor = engine.executor

    def send(now: float) -> None:
        while pending and pending[0].arrival_s <= now:
            queued.append(pending.popleft())
        while queued and (free_slots is None or free_slots):
            spec = queued.popleft()
            send_s = spec.arrival_s if free_slots is None else max(spec.arrival_s, heapq.heappop(free_slots))
            if free_slots is not None and duration_s is not None and send_s >= duration_s:
                continue  # as the runner: past the time limit a request still waiting for a slot is never sent
            prompt = prompt_token_ids(spec, vocab)
            record = RequestRecord(spec.index, spec.arrival_s, send_s, spec.prompt_len, spec.output_len,
                                   prompt_tokens=len(prompt), output_tokens_source="usage")
            params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
            request_slo, request_priority = slo(spec) if slo else None, priority(spec) if priority else 0
            refused = None
            if gate is not None:
                candidate = Request(str(spec.index), prompt, params, send_s, request_priority, request_slo)
                refused = gate.check(LoadSnapshot.of(engine.scheduler, clock.now()), candidate).reject
            if refused is not None:
                record.status, record.error_kind, record.error, record.end_s = 429, "http_429", refused, send_s
            else:
                try:
                    engine.add_request(str(spec.index), prompt, params, arrival_time=send_s,
                                       priority=request_priority, slo=request_slo)
                except ValueError as error:  # what the server answers with a 400
                    record.status, record.error_kind, record.error, record.end_s = 400, "http_400", str(error), send_s
            if record.status is not None:
                records.append(record)
                if free_slots is not None:
                    heapq.heappush(free_slots, send_s)
                continue
            live[str(spec.index)] = record

    while True:
        send(clock.now())
        if not engine.has_unfinished_requests():
            if not pending:
                break
            clock.advance_to(pending[0].arrival_s)  # idle: jump across the gap
            continue
        steps = executor.num_steps
        outputs = engine.step()
        if executor.num_steps == steps:
            raise RuntimeError("the scheduler planned nothing while requests wait: the simulation cannot advance")
        for out in outputs:
            if out.finished:
                record = live.pop(out.request_id)
                completion = out.outputs[0]
                record.token_times_s, record.chunk_tokens = arrivals(completion.token_times)
                record.output_tokens = len(completion.token_ids)
                record.end_s = out.finished_time
                record.status, record.finish_reason = 200, completion.finish_reason
                records.append(record)
                if free_slots is not None:
                    heapq.heappush(free_slots, out.finished_time)
    end = max((r.end_s for r in records if r.end_s is not None), default=0.0)
    records.sort(key=lambda r: r.index)
    return SimOutcome(records, end, executor.num_steps, executor.busy_seconds,
                      [int(i) for i in executor.first_scheduled])
