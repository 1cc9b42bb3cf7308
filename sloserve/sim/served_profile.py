"""A profile harvested from a serving run: the engine's online-calibrated step-time model and its measured steps."""
from __future__ import annotations

import time

import numpy as np

from sloserve.config import EngineConfig
from sloserve.engine.cost_model import FitError, FittedModel, LinearCostModel
from sloserve.engine.engine import LLMEngine
from sloserve.engine.features import OVERHEAD_TERMS
from sloserve.sim.profile import Profile, Timing, describe_machine
from sloserve.sim.profiler import engine_info, model_info
from sloserve.sim.rank_cost import rank_seconds_per_waiting


def served_profile(config: EngineConfig, engine: LLMEngine) -> Profile:
    """The predictor's current model as a Profile that `sloserve simulate --profile` reads.

    Its steps are whole engine steps, so the execute table carries them and the overhead terms are
    the fit's own split. The train error is the final model's on the kept steps; the held-out error
    is the prequential one (each step predicted before it ran). The policies' cost of ranking a queue is
    measured as the profiler does (the served steps saw only their own policy's queues).
    """
    predictor = engine.predictor
    model = predictor.model
    steps = list(predictor.observations)
    if not steps:
        raise ValueError("the engine measured no steps: nothing to save")
    n = model.num_execute_terms
    execute = LinearCostModel(model.features.execute.terms, model.coefficients[:n])
    overhead = LinearCostModel(OVERHEAD_TERMS, model.coefficients[n:])
    measured = np.array([t for _, t in steps])
    train = FitError.of(np.array([model.step_seconds(s) for s, _ in steps]), measured)
    nothing = FitError(0, 0.0, 0.0, 0.0)  # no separate overhead measurements (JSON has no NaN)
    return Profile(
        machine=describe_machine(config.device),
        model=model_info(config, engine.executor),
        engine=engine_info(config, engine),
        token_knots=model.knots,
        execute=FittedModel(execute, train, predictor.error(), 1),
        overhead=FittedModel(overhead, nothing, nothing, 1),
        settings={"source": "serve", "steps_observed": predictor.num_observed, "refits": predictor.num_refits,
                  "window": len(steps)},
        execute_timings=[Timing(s, t, "serve") for s, t in steps],
        rank_seconds_per_waiting=rank_seconds_per_waiting(model, config.max_num_batched_tokens, config.block_size),
        created_unix=time.time(),
    )
