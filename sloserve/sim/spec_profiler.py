"""Profiling speculation: the draft model's step time over the same shape grid as the target's, and a real
speculative engine run measuring acceptance and what a proposal costs beyond the draft's forward passes."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from sloserve.config import EngineConfig
from sloserve.engine.engine import LLMEngine
from sloserve.engine.features import ExecuteFeatures, token_knots
from sloserve.engine.kv_cache import BlockManager
from sloserve.sim.profile import Timing
from sloserve.sim.profiler import (ProfileSettings, TimingExecutor, add_engine_run_requests, fit_timings, model_info,
                                   time_grid)
from sloserve.sim.shapes import GridLimits, PlanBuilder, step_grid
from sloserve.sim.speculation import SpeculationProfile
from sloserve.spec.draft_cost import draft_model_seconds
from sloserve.spec.speculation import Speculation


def profile_speculation(config: EngineConfig, engine: LLMEngine, speculation: Speculation, settings: ProfileSettings,
                        log: Callable[[str], None]) -> tuple[SpeculationProfile, list[Timing]]:
    """`engine` is the target's, with `speculation` detached; it is attached for the engine run and detached again.
    Returns what was measured, and the target's execute time of each step of that run (verification shapes)."""
    proposer = speculation.proposer
    draft = getattr(proposer, "executor", None)  # the draft model's ModelExecutor (method draft_model)
    profiled = SpeculationProfile(dataclasses.asdict(speculation.config), None, None, None)
    if draft is not None:
        limits = GridLimits(config.max_num_batched_tokens, config.max_num_seqs, engine.max_model_len,
                            draft.num_kv_blocks, config.block_size)
        grid = step_grid(limits, settings.quick)
        log(f"timing the draft model over {len(grid)} step shapes x {settings.repeats} repeats")
        timings, _ = time_grid(draft, PlanBuilder(BlockManager(draft.num_kv_blocks, config.block_size), engine.vocab_size),
                               grid, settings.repeats, settings.warmups)
        features = ExecuteFeatures(token_knots(config.max_num_batched_tokens))
        profiled.draft_execute = fit_timings(features.terms, features, timings, settings.holdout_every)
        profiled.draft_token_knots = features.knots
        profiled.draft_model = model_info(dataclasses.replace(config, model=speculation.config.model), draft)
    log(f"timing a speculative engine run of {settings.engine_requests} requests")
    proposals, steps, rate = _speculative_run(engine, speculation, settings)
    profiled.proposal_rate = rate
    measured = speculation.acceptance.measured()
    stats = speculation.stats
    profiled.per_token_acceptance = measured
    profiled.acceptance_rate = stats.acceptance_rate if stats.num_draft_tokens else None
    profiled.mean_accepted_length = stats.mean_accepted_length if stats.num_drafts else None
    step = profiled.draft_step_model()
    if step is not None and proposals:
        predicted = sum(draft_model_seconds(step, ks, cs) for ks, cs, _ in proposals)
        # Batch building, sampling and cache bookkeeping around the forward passes: a ratio the simulator charges.
        profiled.draft_scale = sum(s for _, _, s in proposals) / predicted if predicted > 0 else 1.0
    if draft is None:
        profiled.ngram_seconds_per_token = proposer.seconds_per_token
    return profiled, steps


def _speculative_run(engine: LLMEngine, speculation: Speculation,
                     settings: ProfileSettings) -> tuple[list[tuple[list[int], list[int], float]], list[Timing], float]:
    """Requests like the profile's engine run, speculating: per proposal ks, contexts and seconds; per step its timing;
    the share of requests asked for drafts that got any."""
    proposer = speculation.proposer
    proposals, steps, asked, answered = [], [], [0], [0]
    propose = proposer.propose

    def timed(batch):
        start = time.perf_counter()
        drafts = propose(batch)
        asked[0] += len(batch)
        answered[0] += sum(1 for d in drafts if d)
        proposals.append(([r.k for r in batch], [len(r.token_ids) for r in batch], time.perf_counter() - start))
        return drafts

    proposer.propose = timed
    engine.speculator = speculation
    timing = engine.executor = TimingExecutor(engine.executor)
    try:
        # Longer outputs than the target's run: a speculative run needs decode steps to verify.
        add_engine_run_requests(engine, settings.engine_requests, settings.seed + 1, "profile-spec", (8, 64))
        while engine.has_unfinished_requests():
            engine.step()
            if timing.last is not None:
                steps.append(Timing(timing.last[0], timing.last[1], "engine"))
                timing.last = None
    finally:
        engine.speculator, engine.executor = None, timing.inner
        del proposer.propose  # the instance attribute: the method shows through again
    return proposals, steps, answered[0] / asked[0] if asked[0] else 1.0
