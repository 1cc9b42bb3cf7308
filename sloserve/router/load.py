"""A replica's load report: plain data the router reads to choose a replica (it may cross a process boundary)."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.engine.admission import LoadSnapshot
from sloserve.engine.async_engine import AsyncLLMEngine, EngineStats
from sloserve.engine.engine import LLMEngine
from sloserve.router.spec_totals import wire_copy
from sloserve.spec.speculation import SpecDecodeStats


@dataclass(slots=True)
class ReplicaLoad:
    replica: int
    ready: bool = True  # False: dead or restarting; the router sends it nothing
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    num_received: int = 0  # requests the replica has taken since it (re)started: the router counts the rest in flight
    max_num_batched_tokens: int = 512
    block_size: int = 16
    # The replica's step-time model (engine/cost.py StepCostModel), calibrated on its own steps.
    knots: tuple[int, ...] = ()
    coefficients: tuple[float, ...] = ()
    snapshot: LoadSnapshot = field(default_factory=LoadSnapshot)  # what TTFT prediction needs of its queue
    # Seconds until the step in progress ends, as of the report (0 between steps): nothing new starts sooner.
    busy_s: float = 0.0
    policy: str = "fcfs"  # the replica's scheduling policy: the router ranks a new request as it would

    stats: EngineStats = field(default_factory=EngineStats)  # for /metrics, per replica
    spec_decode: SpecDecodeStats | None = None  # its spec-decode counters (None: it does not speculate)
    # Reports reach the front by two roads (with outputs, and answering a poll), so they may arrive out of order:
    # `seq` orders the reports of one run of the replica (`incarnation`; a restarted one counts from 0 again).
    incarnation: str = ""
    seq: int = 0

    @classmethod
    def of(cls, replica: int, engine: AsyncLLMEngine, num_received: int) -> ReplicaLoad:
        """From what the step loop snapshots between steps (the engine itself may be mid-step)."""
        stats, config, model = engine.stats, engine.engine.config, engine.engine.predictor.model
        spec = getattr(engine.engine.speculator, "stats", None)
        return cls(replica, engine.is_running, stats.num_running, engine.num_waiting, engine.num_waiting_tokens,
                   num_received, config.max_num_batched_tokens, config.block_size, tuple(model.knots),
                   tuple(model.coefficients), engine.load, engine.step_seconds_left(), config.policy, stats,
                   None if spec is None else wire_copy(spec))

    @classmethod
    def of_engine(cls, replica: int, engine: LLMEngine, num_received: int, busy_s: float = 0.0) -> ReplicaLoad:
        """Straight from an engine no other thread steps (the simulator's; `busy_s` from its virtual clock)."""
        scheduler, config, model = engine.scheduler, engine.config, engine.predictor.model
        snapshot = LoadSnapshot.of(scheduler, engine.clock.now())
        return cls(replica, True, len(scheduler.running), len(scheduler.waiting), sum(t for _, t in snapshot.waiting),
                   num_received, config.max_num_batched_tokens, config.block_size, tuple(model.knots),
                   tuple(model.coefficients), snapshot, busy_s, config.policy)
