"""The scheduler's own cost of ranking waiting requests, per policy: measured, so the simulator charges it."""
from __future__ import annotations

import time

from sloserve.engine.clock import MonotonicClock
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import POLICIES, make_policy
from sloserve.engine.scheduler import Scheduler, SchedulerConfig
from sloserve.request import SLO, Request, SamplingParams

# The live predictor refits every 32 steps, and each refit empties the SLO policy's memo of predictions.
_REFIT_EVERY = 32


def rank_seconds_per_waiting(model: StepCostModel, max_num_batched_tokens: int, block_size: int,
                             num_waiting: int = 256, steps: int = 64) -> dict[str, float]:
    """Per policy: the seconds one schedule() spends per waiting request (ranking, prefix-cache lookup,
    the prefill-rate pass), the slope between a queue of `num_waiting` and an empty one.

    The simulator's step-time model has no term for the queue (a profile's steps see short queues),
    so under deep queues it would be optimistic for a policy whose ranking costs more than FCFS's.
    """
    costs = {}
    for policy in POLICIES:
        deep = _mean_schedule_seconds(policy, model, max_num_batched_tokens, block_size, num_waiting, steps)
        empty = _mean_schedule_seconds(policy, model, max_num_batched_tokens, block_size, 0, steps)
        costs[policy] = max(0.0, (deep - empty) / num_waiting)
    return costs


def _mean_schedule_seconds(policy: str, model: StepCostModel, budget: int, block_size: int, num_waiting: int,
                           steps: int) -> float:
    clock = MonotonicClock()
    predictor = StepPredictor(model, calibrate=False)
    scheduler = Scheduler(BlockManager(64, block_size), make_policy(policy, clock, predictor, budget),
                          SchedulerConfig(budget, 1, block_size, policy), predictor)
    # One decoding request holds the only seat and never gives it up (it gave way once already, and it has
    # the best priority and the tightest TPOT), so every step ranks the whole queue and admits nobody.
    seated = Request("seated", [1, 2, 3, 4], SamplingParams(max_tokens=1 << 20), clock.now(), 0, SLO(ttft=1e9, tpot=1e-3))
    seated.num_preemptions = 1
    scheduler.add(seated)
    scheduler.update_from_output(scheduler.schedule(), [[7]])
    seated.token_times.append(clock.now())
    start = clock.now()
    for i in range(num_waiting):  # distinct prompts of mixed lengths; interactive and batch objectives
        prompt = [5 + (i * 7919 + j) % 30000 for j in range(32 + (i * 37) % 480)]
        slo = SLO(ttft=0.25, tpot=0.05) if i % 3 else SLO(ttft=10.0, tpot=0.2)
        scheduler.add(Request(f"w{i}", prompt, SamplingParams(max_tokens=64), start - 1e-3 * (num_waiting - i), 1, slo))
    elapsed = 0.0
    for step in range(steps):
        if step % _REFIT_EVERY == 0:
            predictor.model = StepCostModel(model.knots, model.coefficients)  # a refit: memos start over
        t = time.perf_counter()
        scheduler.schedule()
        elapsed += time.perf_counter() - t
    return elapsed / steps
