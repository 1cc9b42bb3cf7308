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
    gate = TTFTAdmission(steps, "fcfs", 100)
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
        verdict = gate.check(LoadSnapshot.of(scheduler, 0.0), candidate)
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
    gate = TTFTAdmission(steps, "slo", 100)
    snapshot = LoadSnapshot.of(scheduler, clock.now())
    assert snapshot.decode_contexts == [4] and snapshot.step_time_limit == 0.05
    # One decode per step; the 50 ms TPOT leaves 10 + (1 + k) ms <= 50 ms: chunks of 39 tokens.
    verdict = gate.check(snapshot, request("chat", 60, SLO(ttft=0.2)))
    assert verdict.tokens_ahead == 0  # the batch request ranks behind it
    assert verdict.predicted_ttft == pytest.approx(0.050 + (0.010 + 0.022)) and verdict.reject is None
    # Under FCFS the same batch request would be ahead: 360 tokens at 99 a step.
    fcfs = TTFTAdmission(steps, "fcfs", 100)
    assert fcfs.check(LoadSnapshot(decode_contexts=[4], waiting=[((0.0,), 300)]), request("chat", 60, SLO(ttft=0.2))
                      ).reject is not None


def test_admission_predicts_the_chunks_the_scheduler_cuts_where_the_tpot_limit_yields():
    steps = LinearSteps(fixed=0.048, per_token=0.0001)  # four decodes: 48.4 ms, next to the 50 ms TPOT
    gate = TTFTAdmission(steps, "fcfs", 512)
    snapshot = LoadSnapshot(decode_contexts=[4] * 4, step_time_limit=0.05)
    # The limit would leave 16-token chunks (19 steps for 300 tokens: ~0.95 s, over the 200 ms objective).
    # Queued, the request makes the limit yield to the rate its deadline needs, as the scheduler would (see
    # the policy's test): 120-token chunks, 2 x (48.4 + 12.0) + (48.4 + 6.0) ms.
    verdict = gate.check(snapshot, request("long", 300, SLO(ttft=0.2)))
    assert verdict.predicted_ttft == pytest.approx(2 * 0.0604 + 0.0544) and verdict.reject is None
    # With no TTFT objective of its own nothing asks the limit to yield: 16-token chunks.
    assert gate.predict(snapshot, request("long", 300, None))[0] == pytest.approx(18 * 0.050 + (0.0484 + 0.0012))
    # A deadline even an uncut chunk cannot meet (300 tokens in 50 ms: one step takes 78 ms) is refused.
    assert gate.check(snapshot, request("long", 300, SLO(ttft=0.05))).reject is not None


def test_a_cached_prefix_is_not_predicted_as_prefill_work():
    steps = LinearSteps(fixed=0.010, per_token=0.001)
    clock = ManualClock(0.0)
    scheduler = Scheduler(BlockManager(100, 16), SLOPolicy(clock, steps, 100), SchedulerConfig(100, 1), steps)
    first = Request("first", list(range(1, 101)), SamplingParams(max_tokens=8), 0.0, 0, SLO(ttft=1.0))
    scheduler.add(first)
    scheduler.update_from_output(scheduler.schedule(), [[7]])  # its 6 full blocks (96 tokens) enter the cache
    # Shares 80 tokens (5 blocks) with it; waits, as `first` holds the only seat.
    waiting = Request("waiting", list(range(1, 81)) + list(range(900, 940)), SamplingParams(max_tokens=8), 0.0, 0,
                      SLO(ttft=1.0))
    scheduler.add(waiting)
    scheduler.schedule()
    assert waiting in scheduler.waiting and waiting.num_cached_tokens == 80
    # The SLO policy's slack counts the 40 tokens it computes: 1.0 - (10 + 40) ms.
    assert scheduler.policy.rank(waiting)[2] == pytest.approx(1.0 - 0.050)
    snapshot = LoadSnapshot.of(scheduler, clock.now())
    assert snapshot.waiting[0][1] == 40
    gate = TTFTAdmission(steps, "slo", 100)
    # A candidate sharing 64 tokens (4 blocks) is predicted as its 36 other tokens, behind the 40 waiting
    # (no TTFT objective: it ranks after the waiting request).
    cached = Request("c", list(range(1, 65)) + list(range(700, 736)), SamplingParams(max_tokens=8), 0.0, 0, None)
    fresh = Request("f", list(range(500, 536)), SamplingParams(max_tokens=8), 0.0, 0, None)
    uncached = Request("u", list(range(500, 600)), SamplingParams(max_tokens=8), 0.0, 0, None)
    predicted, ahead = gate.predict(snapshot, cached)
    assert ahead == 40 and predicted == pytest.approx(gate.predict(snapshot, fresh)[0])
    assert predicted < gate.predict(snapshot, uncached)[0]
    assert scheduler.block_manager.num_used_blocks == 7  # looking up allocated nothing: `first`'s 7 blocks


def test_the_candidate_is_ranked_at_the_snapshots_instant_not_at_its_arrival():
    # Slack shrinks as the clock runs: ranked later than the waiting requests were, a candidate would look more
    # urgent than it is. Here its deadline is 50 ms after the waiting request's: it is served after it.
    steps = LinearSteps(fixed=0.010, per_token=0.001)
    clock = ManualClock(0.0)
    scheduler = Scheduler(BlockManager(100, 16), SLOPolicy(clock, steps, 100), SchedulerConfig(100, 8), steps)
    scheduler.add(request("waiting", 40, SLO(ttft=1.0)))  # deadline 1.0 s
    snapshot = LoadSnapshot.of(scheduler, clock.now())
    clock.t = 0.3  # the snapshot is 300 ms old when the candidate arrives
    gate = TTFTAdmission(steps, "slo", 100)
    verdict = gate.check(snapshot, request("later", 40, SLO(ttft=0.75), arrival=0.3))  # deadline 1.05 s
    assert verdict.tokens_ahead == 40
    assert gate.check(snapshot, request("sooner", 40, SLO(ttft=0.65), arrival=0.3)).tokens_ahead == 0  # 0.95 s
