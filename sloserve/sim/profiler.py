"""The profiler: times the real ModelExecutor over a grid of step shapes and a real engine run, then fits."""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sloserve.config import EngineConfig
from sloserve.engine.engine import LLMEngine
from sloserve.engine.executor import Executor
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.request import SamplingParams
from sloserve.engine.cost_model import fit_with_holdout
from sloserve.engine.features import OVERHEAD_TERMS, ExecuteFeatures, StepShape, overhead_features, token_knots
from sloserve.sim.profile import Profile, Timing, describe_machine
from sloserve.sim.rank_cost import rank_seconds_per_waiting
from sloserve.sim.shapes import Chunk, GridLimits, PlanBuilder, shape_of, step_grid


@dataclass(slots=True)
class ProfileSettings:
    quick: bool = False  # a small grid for tests and smoke runs
    repeats: int = 3  # timed repetitions per shape (the median is kept)
    warmups: int = 1  # untimed rounds over the whole grid first
    engine_requests: int = 32  # requests of the real engine run that times the engine's own work
    holdout_every: int = 5
    seed: int = 0


class TimingExecutor:
    """Passes plans to the real executor and remembers each step's shape and execute() time."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.num_kv_blocks = inner.num_kv_blocks
        self.last: tuple[StepShape, float, float] | None = None  # shape, execute seconds, seconds spent on the shape

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        start = time.perf_counter()
        shape = StepShape.of(plan)
        ready = time.perf_counter()
        tokens = self.inner.execute(plan)
        self.last = (shape, time.perf_counter() - ready, ready - start)
        return tokens


def profile_model(config: EngineConfig, settings: ProfileSettings, log: Callable[[str], None] = lambda _: None) -> Profile:
    from sloserve.llm import build_engine  # composition happens at the top; the profile uses the served engine

    machine = describe_machine(config.device)  # before the work, so the load average is other people's
    engine = build_engine(config)
    executor = engine.executor
    limits = GridLimits(config.max_num_batched_tokens, config.max_num_seqs, engine.max_model_len,
                        executor.num_kv_blocks, config.block_size)
    grid = step_grid(limits, settings.quick)
    log(f"timing {len(grid)} step shapes x {settings.repeats} repeats (+{settings.warmups} warm-up rounds)")
    grid_timings, spread = time_grid(executor, PlanBuilder(BlockManager(executor.num_kv_blocks, config.block_size),
                                                    engine.vocab_size), grid, settings.repeats, settings.warmups)
    log(f"timing a real engine run of {settings.engine_requests} requests")
    engine_timings, overhead_timings = time_engine_run(engine, settings)
    execute_timings = grid_timings + engine_timings
    features = ExecuteFeatures(token_knots(config.max_num_batched_tokens))
    execute = _fit(features.terms, features, execute_timings, settings.holdout_every)
    overhead = _fit(OVERHEAD_TERMS, overhead_features, overhead_timings, settings.holdout_every)
    profile = Profile(
        machine=machine | {"load_average_after": describe_machine(config.device)["load_average"]},
        model=model_info(config, executor),
        engine=engine_info(config, engine),
        token_knots=features.knots,
        execute=execute,
        overhead=overhead,
        settings=dataclasses.asdict(settings) | {"repeat_spread_median": spread},
        execute_timings=execute_timings,
        overhead_timings=overhead_timings,
        created_unix=time.time(),
    )
    log("timing the policies' ranking of waiting requests")
    profile.rank_seconds_per_waiting = rank_seconds_per_waiting(profile.step_model, config.max_num_batched_tokens,
                                                                config.block_size)
    return profile


def time_grid(executor: Executor, builder: PlanBuilder, grid: list[list[Chunk]], repeats: int,
              warmups: int) -> tuple[list[Timing], float]:
    """Median execute() time per shape, and the median over shapes of (slowest - fastest) / median
    repeat: a noise gauge. Whole-grid rounds spread any burst of noise over all shapes."""
    seconds: list[list[float]] = [[] for _ in grid]
    for round_ in range(warmups + repeats):
        for i, step in enumerate(grid):
            plan = builder.build(step)
            start = time.perf_counter()
            executor.execute(plan)
            elapsed = time.perf_counter() - start
            builder.release(plan)
            if round_ >= warmups:
                seconds[i].append(elapsed)
    spread = statistics.median((max(s) - min(s)) / statistics.median(s) for s in seconds)
    return [Timing(shape_of(step), statistics.median(s), "grid") for step, s in zip(grid, seconds)], spread


def time_engine_run(engine: LLMEngine, settings: ProfileSettings) -> tuple[list[Timing], list[Timing]]:
    """Run requests through the real LLMEngine: per step, execute() time and step() minus execute()."""
    timed = TimingExecutor(engine.executor)
    engine.executor = timed  # the same engine object the server would step, with a stopwatch around the model
    rng = np.random.default_rng(settings.seed)
    longest = max(8, min(256, engine.max_model_len // 2))
    for i in range(settings.engine_requests):
        prompt = [int(t) for t in rng.integers(engine.vocab_size // 10, engine.vocab_size, rng.integers(4, longest))]
        params = SamplingParams(max_tokens=int(rng.integers(2, 48)), temperature=0.0, ignore_eos=True)
        engine.add_request(f"profile-engine-{i}", prompt, params)
    execute, overhead = [], []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if timed.last is None:
            continue
        shape, seconds, own_cost = timed.last
        execute.append(Timing(shape, seconds, "engine"))
        # The stopwatch's own bookkeeping is not the engine's work.
        overhead.append(Timing(shape, max(elapsed - seconds - own_cost, 1e-7), "engine"))
        timed.last = None
    engine.executor = timed.inner
    return execute, overhead


def _fit(terms, features, timings: list[Timing], every: int):
    x = np.array([features(t.shape) for t in timings], dtype=float)
    return fit_with_holdout(terms, x, np.array([t.seconds for t in timings]), every)


def model_info(config: EngineConfig, executor) -> dict:
    model = executor.model
    dtype = next(model.parameters()).dtype
    return {
        "path": config.model, "load_format": config.load_format, "dtype": str(dtype).removeprefix("torch."),
        "shape": dataclasses.asdict(model.shape),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def engine_info(config: EngineConfig, engine: LLMEngine) -> dict:
    executor = engine.executor
    # Measured from the cache the executor really allocated, so it cannot disagree with its sizing.
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in executor.kv_caches)
    return {
        "block_size": config.block_size, "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs, "kv_bytes_per_block": kv_bytes // executor.num_kv_blocks,
        "num_kv_blocks": executor.num_kv_blocks, "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
        "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
        "has_tokenizer": engine.tokenizer is not None,
    }
