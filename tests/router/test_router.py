"""Routing decisions on scripted replica states: each policy, the prefix tie-break, SLO admission across replicas."""
from __future__ import annotations

import dataclasses

import pytest

from sloserve.engine.admission import LoadSnapshot
from sloserve.engine.cost import StepCostModel
from sloserve.engine.kv_cache import BlockManager, chain_hashes
from sloserve.request import SLO
from sloserve.router.load import ReplicaLoad
from sloserve.router.policies import make_routing_policy
from sloserve.router.router import NoReplicaError, Router

BUDGET = 512
MODEL = StepCostModel.default(BUDGET)  # 50 ms a step + 2 ms a token


def load(replica: int, waiting_tokens: list[int] = (), running: int = 0, received: int = 0, ready: bool = True) -> ReplicaLoad:
    snapshot = LoadSnapshot(decode_contexts=[64] * running, waiting=[((0.0,), t) for t in waiting_tokens],
                            free_seats=64 - running)
    return ReplicaLoad(replica, ready, running, len(waiting_tokens), sum(waiting_tokens), received, BUDGET, 16,
                       MODEL.knots, tuple(MODEL.coefficients), snapshot)


def router(policy: str, loads: list[ReplicaLoad], admission: bool = False) -> Router:
    r = Router(make_routing_policy(policy), len(loads), admission=admission)
    for one in loads:
        r.update(one)
    return r


def test_round_robin_alternates_and_skips_a_replica_that_is_down():
    r = router("round_robin", [load(0), load(1), load(2)])
    assert [r.route([1, 2, 3]).replica for _ in range(4)] == [0, 1, 2, 0]
    r.update(load(1, ready=False))
    assert [r.route([1, 2, 3]).replica for _ in range(3)] == [2, 0, 2]


def test_least_loaded_counts_requests_routed_but_not_yet_reported():
    r = router("least_loaded", [load(0, running=2), load(1, running=1)])
    assert r.route([1] * 10).replica == 1
    # Replica 1 has not reported the request yet: the router counts it, so both hold 2 now.
    assert r.route([1] * 10).replica == 0
    r.update(load(0, running=2, received=1))
    r.update(load(1, running=1, received=1))  # replica 1 took it and finished it already: back to 1 outstanding
    assert r.route([1] * 10).replica == 1


def test_slo_routes_to_least_predicted_ttft_where_least_loaded_counts_requests():
    states = [load(0, waiting_tokens=[2000]), load(1, waiting_tokens=[10, 10, 10])]
    assert router("least_loaded", states).route([5] * 40).replica == 0
    slo = router("slo", states)
    route = slo.route([5] * 40)
    assert route.replica == 1
    assert route.predicted_ttft < slo._predictor(states[0]).predict(states[0].snapshot, _req([5] * 40))[0]


def _req(prompt):
    from sloserve.request import Request, SamplingParams
    return Request("x", prompt, SamplingParams(), 0.0)


def test_slo_breaks_near_ties_towards_the_replica_holding_the_prompt_prefix():
    system = list(range(100, 164))  # four full blocks of a shared system prompt
    r = router("slo", [load(0, waiting_tokens=[500]), load(1)])
    assert r.route(system + [1, 2, 3]).replica == 1
    r.update(load(0))
    r.update(load(1, received=1))  # both idle again: an exact tie on predicted TTFT
    assert r.route([7] * 67).replica == 0  # no cached prefix anywhere: replica order
    r.update(load(0, received=1))
    assert r.route(system + [9, 9, 9]).replica == 1  # replica 1 holds the system prompt's blocks
    r.update(load(1, received=2))
    # Within a few ms of the best, the cache still wins ...
    r.update(load(1, waiting_tokens=[1], received=2))
    assert r.route(system + [8]).replica == 1
    # ... far from a tie (replica 1 deep in a queue) it does not.
    r.update(load(1, waiting_tokens=[3000], received=3))
    assert r.route(system + [6]).replica == 0


def test_slo_admission_refuses_only_when_no_replica_can_meet_the_ttft():
    slo = SLO(ttft=0.5)
    busy, idle = load(0, waiting_tokens=[4000]), load(1)
    r = router("round_robin", [busy, idle], admission=True)
    # Round robin's turn is replica 0, but it would miss the objective: replica 1 meets it.
    assert [r.route([3] * 50, slo).replica for _ in range(2)] == [1, 1]
    r = router("round_robin", [busy, load(1, waiting_tokens=[4000])], admission=True)
    refused = r.route([3] * 50, slo)
    assert refused.replica is None and "over its TTFT objective of 500 ms" in refused.reject
    assert refused.predicted_ttft > 0.5
    # Without admission, or without a TTFT objective, the same state routes.
    assert router("round_robin", [busy, load(1, waiting_tokens=[4000])]).route([3] * 50, slo).replica == 0
    assert r.route([3] * 50, SLO(tpot=0.05)).replica is not None


def test_no_ready_replica_raises_and_a_restarted_replica_is_taken_back():
    r = router("least_loaded", [load(0, ready=False), load(1, ready=False)])
    with pytest.raises(NoReplicaError):
        r.route([1, 2])
    r.update(load(1))
    assert r.route([1, 2]).replica == 1


def test_chain_hashes_are_the_block_managers_prefix_identities():
    bm = BlockManager(8, 4)
    tokens = list(range(11))
    assert bm.allocate_slots("a", len(tokens))
    bm.cache_full_blocks("a", len(tokens), lambda s, e: tokens[s:e])
    bm.free("a")
    assert len(bm.cached_prefix(tokens + [99])) == 2
    assert chain_hashes(tokens, 4) == [hash(bm.blocks[b].key) for b in bm.cached_prefix(tokens + [99])]


def test_slo_near_tie_goes_to_the_replica_with_fewer_requests_not_to_the_cached_prefix():
    # The prediction already counts a cached prefix as computed; in a near-tie the cache must not also
    # outrank load, or a prompt's repeats pile onto the replica that first served it.
    system = list(range(100, 116))  # one full block
    r = router("slo", [load(0), load(1, running=20)])
    r.prefix.record(1, chain_hashes(system, 16))
    prompt = system + [1]
    on = {i: r.route(prompt, exclude=frozenset({1 - i})).predicted_ttft for i in (0, 1)}
    r = router("slo", [load(0), load(1, running=20)])  # afresh: the two routes above counted as sent
    r.prefix.record(1, chain_hashes(system, 16))
    assert on[0] < on[1] <= 1.1 * on[0]  # replica 1, with the prefix, within the near-tie of the best
    assert r.route(prompt).replica == 0  # ... but it holds 20 requests to replica 0's none
    r = router("slo", [load(0), load(1)])  # equal load: the replica holding the prefix, not replica order
    r.prefix.record(1, chain_hashes(system, 16))
    assert r.route(prompt).replica == 1


def test_slo_counts_the_step_in_progress_less_the_age_of_the_report():
    prompt = [5] * 40

    def predicted(busy_s: float, reported_at: float, now: float) -> float:
        r = Router(make_routing_policy("slo"), 1)
        r.update(dataclasses.replace(load(0), busy_s=busy_s), now=reported_at)
        return r.route(prompt, now=now).predicted_ttft

    base = predicted(0.0, 0.0, 0.0)
    assert predicted(0.2, 1.0, 1.0) == pytest.approx(base + 0.2)
    assert predicted(0.2, 1.0, 1.15) == pytest.approx(base + 0.05)  # 150 ms of the step done since the report
    assert predicted(0.2, 1.0, 1.5) == pytest.approx(base)  # that step is over
    # Two replicas alike but for the step replica 0 is in the middle of: replica 1 gets the request.
    r = router("slo", [dataclasses.replace(load(0), busy_s=0.03), load(1)])
    assert r.route(prompt).replica == 1


@pytest.mark.parametrize("policy", ["priority", "slo"])
def test_admission_ranks_the_candidate_as_the_replicas_policy_would(policy):
    # A replica serving a queue of batch requests (loose TTFT, lower priority) by priority or slo: an interactive
    # request goes ahead of them there, so it can meet its 250 ms where FCFS would make it wait for the queue.
    from sloserve.engine.policy import make_policy
    from sloserve.engine.scheduler import Scheduler, SchedulerConfig
    from sloserve.request import Request, SamplingParams

    from tests.engine.scripted import ManualClock

    clock = ManualClock()
    clock.t = 100.0
    scheduler = Scheduler(BlockManager(256, 16), make_policy(policy, clock, MODEL, BUDGET), SchedulerConfig(BUDGET, 64),
                          MODEL)
    for i in range(8):
        scheduler.add(Request(f"batch{i}", [3] * 500, SamplingParams(max_tokens=8), 99.0 + i / 10, 1, SLO(ttft=5.0)))
    snapshot = LoadSnapshot.of(scheduler, clock.now())
    assert snapshot.taken_at == 100.0
    state = ReplicaLoad(0, True, 0, 8, 4000, 8, BUDGET, 16, MODEL.knots, tuple(MODEL.coefficients), snapshot,
                        policy=policy)
    interactive = SLO(ttft=0.25)
    served_first = router("round_robin", [state], admission=True).route([3] * 50, interactive, priority=0)
    assert served_first.replica == 0 and served_first.predicted_ttft < 0.25
    # The same queue on an FCFS replica: everything waiting is ahead of it.
    behind = router("round_robin", [dataclasses.replace(state, policy="fcfs")], admission=True)
    assert behind.route([3] * 50, interactive, priority=0).replica is None
    # A request of the queue's own class is ranked behind the queue by either policy: 4000 tokens ahead, over 5 s.
    assert router("round_robin", [state], admission=True).route([3] * 50, SLO(ttft=5.0), priority=1).replica is None
