"""Speculation in the simulator: the engine's own Speculation over a drawn acceptance, on virtual time."""
import pytest
from conftest import known_profile

from sloserve.bench.workload import RequestSpec
from sloserve.engine.features import StepShape
from sloserve.sim.clock import VirtualClock
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, simulate
from sloserve.sim.speculation import SimSpeculation, SpeculationProfile, sim_speculation
from sloserve.spec.config import SpeculativeConfig

KNOBS = EngineKnobs(max_num_batched_tokens=64, max_num_seqs=8, num_kv_blocks=64, max_model_len=256, block_size=16,
                    vocab_size=384)
K = 4
DRAFT_STEP = 1e-3  # seconds per draft forward pass, whatever its shape


def specs(n=6, output_len=lambda i: 13 + 5 * i):
    return [RequestSpec(i, [50 + (i * 13 + j) % 300 for j in range(12 + 3 * i)], 12 + 3 * i, output_len(i), 0.0)
            for i in range(n)]


def draft_cost(ks, contexts):
    return DRAFT_STEP * max(ks, default=0)


def run(acceptance=None, k_policy="fixed", workload=None, seed=0, proposal_rate=1.0):
    clock = VirtualClock()
    speculation = None
    if acceptance is not None:
        config = SpeculativeConfig("draft_model", K, model="draft", k_policy=k_policy)
        speculation = SimSpeculation(config, acceptance, draft_cost, proposal_rate=proposal_rate, seed=seed)
    engine = build_sim_engine(known_profile().step_model, KNOBS, "fcfs", clock, speculation=speculation)
    verified = []  # (drafts, tokens emitted) per verification
    execute = engine.executor.execute

    def spy(plan):
        sampled = execute(plan)
        verified.extend((len(s.spec_token_ids), len(t)) for s, t in zip(plan.scheduled, sampled) if s.spec_token_ids)
        return sampled

    engine.executor.execute = spy
    outcome = simulate(engine, clock, workload or specs())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # every block freed
    assert not engine.has_unfinished_requests()
    return engine, outcome, verified


def test_full_acceptance_emits_k_plus_one_tokens_a_verification_in_fewer_steps():
    _, off, _ = run()
    engine, on, verified = run(acceptance=1.0)
    assert verified and all(emitted == drafts + 1 for drafts, emitted in verified)
    assert sum(drafts == K for drafts, _ in verified) > len(verified) // 2  # k = K except near max_tokens
    assert [r.output_tokens for r in on.records] == [r.max_tokens for r in on.records] == [r.output_tokens for r in off.records]
    assert on.num_steps < off.num_steps
    stats = engine.speculator.stats
    assert stats.acceptance_rate == 1.0 and stats.num_emitted_tokens == stats.num_accepted_tokens + stats.num_drafts
    # A step's K + 1 tokens reach the client as one chunk.
    assert max(c for r in on.records for c in r.chunk_tokens) == K + 1
    assert all(sum(r.chunk_tokens) == r.output_tokens for r in on.records)


def test_zero_acceptance_gives_the_same_tokens_one_a_step():
    _, off, _ = run()
    engine, on, verified = run(acceptance=0.0)
    assert verified and all(emitted == 1 for _, emitted in verified)
    assert [r.output_tokens for r in on.records] == [r.output_tokens for r in off.records]
    # Never fewer steps; a step more where drafts took the budget a waiting prompt's chunk would have had.
    assert off.num_steps <= on.num_steps <= off.num_steps + 2
    assert on.duration_s > off.duration_s  # drafting and verifying cost time and bought nothing
    assert engine.speculator.stats.num_accepted_tokens == 0


def test_requests_without_drafts_decode_as_without_speculation():
    _, off, _ = run()
    engine, none, verified = run(acceptance=1.0, proposal_rate=0.0)  # an n-gram lookup that never matches
    assert not verified and engine.speculator.stats.num_drafts == 0
    # The same target steps; the lookups still cost their time.
    assert none.num_steps == off.num_steps and none.busy_s == pytest.approx(off.busy_s)
    assert none.duration_s == pytest.approx(off.duration_s + engine.speculator.proposer.busy_seconds)
    engine, half, verified = run(acceptance=1.0, proposal_rate=0.5, workload=specs(4, output_len=lambda i: 200))
    assert 0.4 < len(verified) / (half.num_steps * 4) < 0.6  # about half of the decoding request-steps verify


def test_draws_are_seeded_and_follow_the_acceptance_rate():
    long = specs(4, output_len=lambda i: 200)
    a = run(acceptance=0.6, workload=long, seed=1)[1]
    b = run(acceptance=0.6, workload=long, seed=1)[1]
    c = run(acceptance=0.6, workload=long, seed=2)[1]
    assert [r.token_times_s for r in a.records] == [r.token_times_s for r in b.records]
    assert [r.token_times_s for r in a.records] != [r.token_times_s for r in c.records]
    engine = run(acceptance=0.6, workload=long, seed=1)[0]
    assert engine.speculator.acceptance.measured() == pytest.approx(0.6, abs=0.06)


def test_a_step_costs_the_draft_and_the_verify_shape_on_the_virtual_clock():
    one = [RequestSpec(0, list(range(50, 70)), 20, 11, 0.0)]
    _, outcome, _ = run(acceptance=1.0, workload=one)
    r = outcome.records[0]
    model = known_profile().step_model
    prefill = model.step_seconds(StepShape([20], [0], [True]))
    # Then: draft K (one batched draft step each), verify K drafts: K + 1 positions after the 20 tokens computed.
    verify = model.step_seconds(StepShape([K + 1], [20], [True], [K]))
    assert r.token_times_s[:2] == pytest.approx([prefill, prefill + K * DRAFT_STEP + verify])
    assert r.chunk_tokens[:2] == [1, K + 1]


def test_adaptive_k_stops_speculating_when_drafts_cost_more_than_they_return():
    engine, _, verified = run(acceptance=0.05, k_policy="adaptive", workload=specs(4, output_len=lambda i: 120))
    assert engine.speculator.last_k == 0
    assert len(verified) < 20  # a few early verifications teach it; then it stops


def test_the_profile_supplies_acceptance_and_cost_and_mismatches_are_refused():
    profiled = SpeculationProfile({"method": "ngram", "num_speculative_tokens": 3}, 0.7, 0.5, 2.4,
                                  ngram_seconds_per_token=1e-6)
    ngram = SpeculativeConfig("ngram", 3)
    sim = sim_speculation(ngram, profiled, None)
    assert sim.acceptance == 0.7 and sim.draft_cost([3], [100]) == pytest.approx(1e-4)
    assert sim_speculation(ngram, profiled, 0.2).acceptance == 0.2
    assert SpeculationProfile.from_dict(profiled.to_dict()) == profiled
    with pytest.raises(ValueError, match="method 'ngram'"):
        sim_speculation(SpeculativeConfig("draft_model", 3, model="d"), profiled, None)
    with pytest.raises(ValueError, match="needs the draft's step time"):
        sim_speculation(SpeculativeConfig("draft_model", 3, model="d"), None, 0.5)
    with pytest.raises(ValueError, match="no acceptance rate"):
        sim_speculation(ngram, None, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sim_speculation(ngram, None, 1.5)
