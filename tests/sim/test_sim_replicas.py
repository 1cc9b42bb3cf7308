"""N simulated replicas behind the router on one virtual timeline (`sloserve simulate --data-parallel-size N`)."""
from conftest import known_profile

from sloserve.bench.workload import RequestSpec
from sloserve.engine.cost import StepCostModel
from sloserve.router.policies import make_routing_policy
from sloserve.router.router import Router
from sloserve.sim.clock import VirtualClock
from sloserve.sim.replicas import build_sim_replicas, simulate_replicas
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate

KNOBS = EngineKnobs(max_num_batched_tokens=32, max_num_seqs=4, num_kv_blocks=128, max_model_len=256, block_size=16,
                    vocab_size=384)


def specs(lengths, gap_s=0.0, output_len=4):
    return [RequestSpec(i, [50 + (i * 13 + j) % 300 for j in range(n)], n, output_len, i * gap_s)
            for i, n in enumerate(lengths)]


def run(n, router, workload):
    replicas = build_sim_replicas(known_profile().step_model, KNOBS, "fcfs", n)
    outcome = simulate_replicas(replicas, Router(make_routing_policy(router), n), workload)
    return replicas, outcome


def ttfts(outcome):
    return [r.token_times_s[0] - r.arrival_s for r in outcome.records]


def test_round_robin_alternates_replicas():
    replicas, outcome = run(2, "round_robin", specs([20] * 8, gap_s=0.01))
    assert [r.routed for r in replicas] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert all(r.status == 200 and r.output_tokens == 4 for r in outcome.records)


def test_one_replica_behind_the_router_is_the_plain_simulation():
    workload = specs([10 + 7 * i % 40 for i in range(12)], gap_s=0.03)
    _, routed = run(1, "slo", workload)
    clock = VirtualClock()
    plain = simulate(build_sim_engine(known_profile().step_model, KNOBS, "fcfs", clock), clock, workload)
    assert [r.token_times_s for r in routed.records] == [r.token_times_s for r in plain.records]


def test_two_replicas_take_a_burst_in_about_half_the_time():
    workload = specs([40] * 16)
    _, one = run(1, "round_robin", workload)
    _, two = run(2, "round_robin", workload)
    assert two.duration_s < 0.6 * one.duration_s


def test_slo_routing_balances_what_round_robin_piles_on_one_replica():
    # Long and short prompts alternate: round robin sends every long one to replica 0.
    workload = specs([200 if i % 2 == 0 else 8 for i in range(12)], gap_s=0.005)
    rr_replicas, rr = run(2, "round_robin", workload)
    slo_replicas, slo = run(2, "slo", workload)
    assert all(i % 2 == 0 for i in rr_replicas[0].routed)
    long_on = [sum(1 for i in r.routed if i % 2 == 0) for r in slo_replicas]
    assert min(long_on) >= 2  # the long prompts are spread over both replicas
    assert max(ttfts(slo)) < max(ttfts(rr))
    assert sorted(ttfts(slo))[-2] < sorted(ttfts(rr))[-2]


def test_slo_routing_sees_the_step_a_replica_is_still_running():
    # Request 0 fills replica 0's step budget and ends in that step: its state after the step looks idle,
    # but its virtual clock is a whole step ahead when request 1 arrives 1 ms later.
    workload = [RequestSpec(0, list(range(60, 92)), 32, 1, 0.0), RequestSpec(1, list(range(200, 208)), 8, 4, 0.001)]
    replicas, outcome = run(2, "slo", workload)
    assert [r.routed for r in replicas] == [[0], [1]]
    first_step = ttfts(outcome)[0]
    assert ttfts(outcome)[1] < first_step  # it did not wait for replica 0's step to end


def test_slo_routing_sends_less_to_a_slower_replica_than_round_robin_and_least_loaded_do():
    # Replica 0 steps at half replica 1's speed (a replica sharing its core with the front end, say);
    # each replica reports its own step-time model, and only slo reads it.
    fast = known_profile().step_model
    slow = StepCostModel(fast.knots, [2 * c for c in fast.coefficients])
    workload = specs([12 + (7 * i) % 20 for i in range(60)], gap_s=0.012, output_len=8)
    outcomes = {}
    for router in ("round_robin", "least_loaded", "slo"):
        replicas = build_sim_replicas(slow, KNOBS, "fcfs", 1) + build_sim_replicas(fast, KNOBS, "fcfs", 1)
        outcomes[router] = (replicas, simulate_replicas(replicas, Router(make_routing_policy(router), 2), workload))
    share_on_slow = {router: len(replicas[0].routed) / len(workload) for router, (replicas, _) in outcomes.items()}
    p99 = {router: sorted(ttfts(outcome))[-2] for router, (_, outcome) in outcomes.items()}
    assert share_on_slow["slo"] < share_on_slow["least_loaded"] < share_on_slow["round_robin"] == 0.5
    assert p99["slo"] < p99["least_loaded"] and p99["slo"] < p99["round_robin"]
