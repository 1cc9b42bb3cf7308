"""Admission by predicted TTFT on a scripted step-time model: exactly the requests predicted late are refused."""
import pytest

from sloserve.engine.admission import LoadSnapshot, TTFTAdmission
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import FCFS, SLOPolicy
from sloserve.engine.scheduler import Scheduler, SchedulerConfig
from sloserve.request import SLO, Request, SamplingParams

from .scripted import LinearSteps, ManualClock


def request(rid, prompt_len, slo, arrival=0.0) -> Request:
    return Request(rid, [1] * prompt_len, SamplingParams(max_tokens=8), arrival, 0, slo)


def test_fcfs_admission_refuses_exactly_the_requests_predicted_late():
    steps = LinearSteps(fixed=0.010, per_token=0.001)  # a full 100-token chunk: 110 ms
    scheduler = Scheduler(BlockManager(100, 16), FCFS(), SchedulerConfig(100, 8), steps)
    gate = TTFTAdmission(steps, scheduler.policy, 100)
    arrivals = [  # (id, prompt tokens, TTFT SLO, predicted TTFT worked out by hand: everything waiting is ahead)
        ("r0", 50, 0.3, 0.060),  # 50 tokens: one 50-token step
        ("r1", 80, 0.3, 0.150),  # 130: a full chunk (110 ms) + 30 tokens (40 ms)
        ("r2", 200, 0.3, 0.370),  # 330: 3 x 110 + 40 ms > 300 ms: refused
        ("r3", 60, 0.3, 0.210),  # 190 (r2 never queued): 110 + 100 ms
        ("r4", 40, 0.2, 0.260),  # 230: 2 x 110 + 40 ms > 200 ms: refused
        ("r5", 10, None, 0.220),  # 200: two full chunks; no TTFT objective: always admitted
        ("r6", 5, 0.3, 0.235),  # 205: 2 x 110 + 15 ms
    ]
    refused = []
    for rid, n, ttft, expected in arrivals:
        candidate = request(rid, n, SLO(ttft=ttft) if ttft else None)
        verdict = gate.check(LoadSnapshot.of(scheduler), candidate)
        assert verdict.predicted_ttft == pytest.approx(expected), rid
        if verdict.reject:
            refused.append(rid)
            assert "over its TTFT objective" in verdict.reject and verdict.retry_after_s >= 1
        else:
            scheduler.add(candidate)
    assert refused == ["r2", "r4"]


def test_running_decodes_share_every_step_and_the_slo_policy_counts_only_requests_served_first():
    clock = ManualClock(0.0)
    steps = LinearSteps(fixed=0.010, per_token=0.001)
    scheduler = Scheduler(BlockManager(100, 16), SLOPolicy(clock, steps, 100), SchedulerConfig(100, 8), steps)
    running = request("running", 4, SLO(ttft=1.0, tpot=0.05))
    scheduler.add(running)
    plan = scheduler.schedule()
    scheduler.update_from_output(plan, [[7]])
    running.token_times.append(0.0)
    scheduler.add(request("batch", 300, SLO(ttft=30.0)))  # waiting, but with far more slack
    gate = TTFTAdmission(steps, scheduler.policy, 100)
    snapshot = LoadSnapshot.of(scheduler)
    assert snapshot.decode_contexts == [4] and snapshot.step_time_limit == 0.05
    # One decode per step; the 50 ms TPOT leaves 10 + (1 + k) ms <= 50 ms: chunks of 39 tokens.
    verdict = gate.check(snapshot, request("chat", 60, SLO(ttft=0.2)))
    assert verdict.tokens_ahead == 0  # the batch request ranks behind it
    assert verdict.predicted_ttft == pytest.approx(0.050 + (0.010 + 0.022)) and verdict.reject is None
    # Under FCFS the same batch request would be ahead: 360 tokens at 99 a step.
    fcfs = TTFTAdmission(steps, FCFS(), 100)
    assert fcfs.check(LoadSnapshot(decode_contexts=[4], waiting=[((0.0,), 300)]), request("chat", 60, SLO(ttft=0.2))
                      ).reject is not None
