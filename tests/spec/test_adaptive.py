"""Adaptive speculation length: the k with the most expected tokens per predicted second, 0 under heavy load, priced by
the engine's step-time predictor, which learns what a verification costs from the steps it runs."""
import pytest

from sloserve.engine.engine import LLMEngine
from sloserve.engine.features import StepShape
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.spec.adaptive import AcceptanceEstimator, Exploration, candidates, choose_k, expected_tokens, totals_by_k
from sloserve.spec.config import SpeculativeConfig
from sloserve.spec.speculation import Speculation
from tests.engine.fakes import run_to_completion
from tests.spec.test_spec_engine import CountingVerifier


class ComputeBound:
    """A step costs a fixed overhead plus a per-token cost that grows once the batch passes `knee` tokens
    (a CPU saturates: then every drafted token costs about as much as a decoded one)."""

    def __init__(self, fixed=0.010, cheap=0.0002, dear=0.002, knee=16):
        self.fixed, self.cheap, self.dear, self.knee = fixed, cheap, dear, knee

    def step_seconds(self, shape: StepShape) -> float:
        tokens = sum(shape.new_tokens)
        return self.fixed + self.cheap * min(tokens, self.knee) + self.dear * max(0, tokens - self.knee)


def pick(batch, alpha, max_k=4, draft=lambda ks, cs: 0.0):
    return choose_k(max_k, [max_k] * batch, [100] * batch, [alpha] * batch, ComputeBound(), draft)


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_totals_by_k_sum_each_rows_expected_tokens_up_to_its_limit():
    alphas, limits, rates = [0.5, 0.9, 1.0, 0.7], [4, 2, 3, 0], [1.0, 0.5, 1.0, 1.0]
    tokens, drafts = totals_by_k(4, limits, alphas, rates)
    for k in range(5):
        xs = [min(k, limit) for limit in limits]
        assert tokens[k] == pytest.approx(sum(m * expected_tokens(a, x) + 1 - m if x else 1.0
                                              for a, x, m in zip(alphas, xs, rates)))
        assert drafts[k] == pytest.approx(sum(m * x for x, m in zip(xs, rates)))


def test_light_load_and_good_drafts_speculate_fully():
    assert pick(batch=1, alpha=0.8) == 4


def test_heavy_load_falls_to_no_speculation():
    assert pick(batch=32, alpha=0.8) == 0


def test_poor_acceptance_does_not_speculate():
    assert pick(batch=1, alpha=0.0) == 0


def test_the_draft_cost_counts():
    assert pick(batch=1, alpha=0.6, draft=lambda ks, cs: 0.008 * max(ks)) < pick(batch=1, alpha=0.6)


def test_rows_that_find_no_draft_yield_one_token_and_verify_nothing():
    # n-gram rows without a match draft nothing: they yield only their own token and add nothing to the step, so a
    # k's expected gain and its added price both scale with the rows' draft rate.
    def gains(rate):
        cands = candidates(4, [4] * 8, [100] * 8, [0.7] * 8, ComputeBound(), lambda ks, cs: 0.0,
                           draft_rates=[rate] * 8)
        return [(c.tokens - cands[0].tokens, c.seconds - cands[0].seconds) for c in cands[1:]]

    for (tokens, seconds), (full_tokens, full_seconds) in zip(gains(0.25), gains(1.0)):
        assert tokens == pytest.approx(0.25 * full_tokens) and seconds == pytest.approx(0.25 * full_seconds)
        assert seconds > 0


def test_draft_rate_per_request_starts_at_one_and_learns_from_what_the_proposer_returned():
    est = AcceptanceEstimator(prior_weight=4.0)
    assert est.draft_rate("new") == 1.0  # until a proposal came back empty, a row is assumed to draft
    for found in (True, False, False, False):
        est.asked("a", found)
    est.asked("b", True)
    overall = (2 + 1) / (5 + 1)  # two of five proposals drafted, with a weak start at 1
    assert est.draft_rate("a") == pytest.approx((1 + 4 * overall) / (4 + 4))
    assert est.draft_rate("b") > est.draft_rate("a")
    est.forget("a")
    assert est.draft_rate("a") == pytest.approx(overall)


def test_acceptance_estimate_per_request_with_a_shared_prior():
    est = AcceptanceEstimator(prior_weight=4)
    for _ in range(20):
        est.observe("good", 4, 4)  # all accepted: no rejection trial
        est.observe("bad", 4, 0)
    assert est.alpha("good") > 0.9 and est.alpha("bad") < 0.2
    # A new request starts from the overall rate: 80 accepted of 100 trials, after a start of 1 of 2.
    assert est.alpha("new") == pytest.approx(81 / 102)


class Fitted:
    """A fitted step model, seconds by the step's new tokens."""

    def __init__(self, seconds_by_tokens):
        self.seconds_by_tokens = seconds_by_tokens

    def step_seconds(self, shape: StepShape) -> float:
        return self.seconds_by_tokens[sum(shape.new_tokens)]


def test_no_speculation_is_the_floor_of_any_predicted_step():
    # A fit calling a verification cheaper than a decode is not believed: with drafts that are never accepted,
    # every k yields one token for at least k = 0's time, and k = 0 stays.
    fit = Fitted({1: 0.002, 2: 0.0001, 3: 0.0001, 4: 0.0001, 5: 0.0001})
    assert choose_k(4, [4], [150], [0.0], fit, lambda ks, cs: 0.0) == 0


class ShapeClock:
    """Time passes only while the executor runs: 1 ms a step plus `per_extra_token` for every token past one a row."""

    def __init__(self, per_extra_token: float) -> None:
        self.t, self.per_extra_token = 0.0, per_extra_token

    def now(self) -> float:
        return self.t

    def run(self, plan) -> None:
        self.t += 0.001 + self.per_extra_token * sum(s.num_new_tokens - 1 for s in plan.scheduled)


class TimedVerifier(CountingVerifier):
    def __init__(self, clock: ShapeClock) -> None:
        super().__init__(num_kv_blocks=128)
        self.clock = clock

    def execute(self, plan):
        self.clock.run(plan)
        return super().execute(plan)


class RightDrafts:
    """Drafts the counting model's continuation (every draft accepted), at no cost."""

    draft_probs: dict = {}

    def propose(self, batch):
        return [[r.token_ids[-1] + 1 + i for i in range(r.k)] for r in batch]

    def forget(self, request_ids):
        pass

    def predict_seconds(self, ks, contexts):
        return 0.0


class CountedDrafts(RightDrafts):
    def __init__(self) -> None:
        self.batches = []

    def propose(self, batch):
        self.batches.append([r.k for r in batch])
        return super().propose(batch)


def learning_predictor():
    """The engine's own predictor from its conservative default (50 ms a step, 2 ms a token), calibrated online."""
    return StepPredictor(StepCostModel.default(512))


def adaptive_run(per_extra_token: float, max_tokens: int = 600):
    clock = ShapeClock(per_extra_token)
    spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=4, k_policy="adaptive"), CountedDrafts(),
                       max_model_len=1000, clock=clock)
    engine = LLMEngine(TimedVerifier(clock), SchedulerConfig(max_num_batched_tokens=512, block_size=8), max_model_len=1000,
                       vocab_size=100000, clock=clock, speculator=spec, predictor=learning_predictor())
    engine.add_request("r", [10, 11], SamplingParams(max_tokens=max_tokens))
    out = run_to_completion(engine)["r"]
    assert out.outputs[0].token_ids == list(range(12, 12 + max_tokens))  # exact whatever k was chosen
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return spec


def test_adaptive_speculates_where_the_steps_it_ran_show_verifying_cheap():
    spec = adaptive_run(per_extra_token=0.00002)  # a verification of 4 drafts: 1.08 ms, a decode 1 ms
    steps = spec.stats.steps_per_k
    # Every step verifies 4 drafts but the explorations of k = 0 (after 64 and 128 verifying steps: ~120 steps).
    assert steps[0] <= 2 and steps[4] >= sum(steps) - 3


def test_adaptive_turns_to_k_0_where_the_steps_it_ran_show_verifying_dear():
    # A k = 4 verification: 9 ms for at most 5 tokens, a decode 1 ms. The default model's prices (a step's fixed cost
    # dominates) favour verifying, until the predictor has measured both: an exploration of k = 0 after 64 steps.
    spec = adaptive_run(per_extra_token=0.002)
    steps = spec.stats.steps_per_k
    verifying = sum(steps[1:])
    # 64 steps on the default's prices, up to a refit's 32 more, then k = 0 but for explorations (64, 128 steps on).
    assert verifying <= 64 + 32 + 2 and steps[0] >= 150
    # The proposer was asked for drafts on the steps that verify, never while k was 0.
    assert len(spec.proposer.batches) == verifying and all(ks and min(ks) > 0 for ks in spec.proposer.batches)


class SaturatingClock(ShapeClock):
    """A CPU whose linear layers saturate: a step's tokens cost 20 us each up to 8, 1 ms each past that. Verifying
    4 drafts is cheap beside one row and dear beside nine."""

    def run(self, plan) -> None:
        tokens = sum(s.num_new_tokens for s in plan.scheduled)
        self.t += 0.001 + 0.00002 * min(tokens, 8) + 0.001 * max(0, tokens - 8)


def test_a_clear_k_0_is_held_without_weighing_and_k_returns_when_the_load_drops(monkeypatch):
    import sloserve.spec.speculation as speculation_module

    weighed = []
    original = speculation_module.candidates
    monkeypatch.setattr(speculation_module, "candidates", lambda *a: weighed.append(len(a[1])) or original(*a))
    clock = SaturatingClock(0.0)
    spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=4, k_policy="adaptive"), CountedDrafts(),
                       max_model_len=2000, clock=clock)
    engine = LLMEngine(TimedVerifier(clock), SchedulerConfig(max_num_batched_tokens=512, block_size=32), max_model_len=2000,
                       vocab_size=100000, clock=clock, speculator=spec, predictor=learning_predictor())
    params = lambda n: SamplingParams(max_tokens=n)  # noqa: E731
    engine.add_request("long", [10, 11], params(1000))
    trace = []  # (requests running into the step, its k) per step

    def run(steps=None):
        while engine.has_unfinished_requests() and (steps is None or steps > 0):
            rows = len(engine.scheduler.running)
            engine.step()
            trace.append((rows, spec.last_k))
            steps = None if steps is None else steps - 1

    run(60)  # alone: verifying 4 drafts is cheap
    assert trace[-1] == (1, 4)
    for i in range(8):
        engine.add_request(f"short{i}", [1000 * (i + 1)], params(300))
    run(40)  # 9 rows: verifying is dear there, as the predictor learns from them within a refit or two
    assert trace[-1] == (9, 0)
    before = len(weighed)
    run(80)  # k = 0, clearly, mostly held without weighing
    zeros = sum(1 for rows, k in trace[100:] if rows == 9 and k == 0)
    assert zeros >= 78 and len(weighed) - before < zeros / 4
    proposals = len(spec.proposer.batches)
    run(40)  # still loaded: the proposer is asked for drafts on the steps that verify, never while k is 0
    assert all(rows == 9 for rows, _ in trace[180:])
    assert len(spec.proposer.batches) - proposals == sum(1 for _, k in trace[180:] if k)
    run()  # the short requests finish: alone again, the long one speculates at once
    alone = [k for rows, k in trace[220:] if rows == 1]
    assert alone[:-1].count(4) >= len(alone) - 3  # but an exploration of k = 0; the last: no room for a draft
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_exploration_waits_longer_after_each_exploration_that_does_not_turn_the_choice():
    explore = Exploration(every=2, most=8)
    waits = []
    for _ in range(5):
        steps = 0
        while explore.step(0, 4) == 0:
            steps += 1
        waits.append(steps)
    assert waits == [2, 4, 8, 8, 8]
    explore.step(3, 0)  # the prices turned to verifying: the wait restarts at its shortest
    assert [explore.step(3, 0) for _ in range(3)] == [3, 0, 3]


def test_acceptance_by_draft_position_prices_each_k_as_verifications_yielded():
    # Drafts that stand or fall together (a copy-heavy workload): the first draft is accepted 3 times in 4, each
    # later one about 19 times in 20 given those before. One per-token rate misprices the k's; the estimate by
    # position yields, for every k, the tokens the same verifications would have emitted at that k.
    est = AcceptanceEstimator()
    outcomes = []
    for i in range(400):
        accepted = 0 if i % 4 == 0 else next((j for j in (1, 2, 3) if (i * 7 + j) % 20 == 0), 4)
        est.observe(f"r{i % 8}", 4, accepted)
        outcomes.append(accepted)
    factors = est.position_factors(4)
    overall = est.alpha("new")
    geometric_errors = []
    for k in range(1, 5):
        emitted = sum(min(a, k) + 1 for a in outcomes) / len(outcomes)
        assert totals_by_k(4, [k], [overall], [1.0], factors)[0][k] == pytest.approx(emitted, rel=0.005)
        geometric_errors.append(abs(totals_by_k(4, [k], [overall], [1.0])[0][k] / emitted - 1))
    assert max(geometric_errors) > 0.05


def test_position_factors_are_one_before_any_verification_and_for_geometric_acceptance():
    est = AcceptanceEstimator()
    assert est.position_factors(4) == [pytest.approx(1.0)] * 4
    # Each draft accepted with probability 0.8 whatever came before (the geometric model's world).
    import random

    rng = random.Random(0)
    for i in range(4000):
        accepted = next((j for j in range(4) if rng.random() >= 0.8), 4)
        est.observe(str(i % 4), 4, accepted)
    assert est.position_factors(4) == [pytest.approx(1.0, abs=0.04)] * 4


def test_a_shift_in_acceptance_moves_the_estimates_within_a_window():
    # A long-running server: a workload whose drafts were nearly all accepted turns into one whose drafts are
    # rejected. Counts that never decay would weigh the thousands of old verifications for ever.
    est = AcceptanceEstimator()
    for i in range(3000):
        est.observe(f"old{i % 16}", 4, 4 if i % 10 else 1)
    assert est.alpha("new") > 0.9 and est.position_factors(4)[0] > 0.9
    for i in range(3000):  # new requests: the first draft accepted 1 time in 5, the rest rejected
        est.observe(f"now{i % 16}", 4, 1 if i % 5 == 0 else 0)
    shifted = 1 / 6  # five verifications: one accepted draft in six trials
    assert est.alpha("new") == pytest.approx(shifted, abs=0.05)
    assert est.measured() == pytest.approx(shifted, abs=0.05)
    # One long request's own estimate follows its own shift within a window of its own verifications.
    for _ in range(200):
        est.observe("long", 4, 4)
    assert est.alpha("long") > 0.95
    for _ in range(3 * 64):  # three of its windows (64 trials)
        est.observe("long", 4, 0)
    assert est.alpha("long") < 0.15
    # And the proposals that find drafts: a row's draft rate follows a shift too.
    for found in [True] * 500 + [False] * 3 * 64:
        est.asked("copy", found)
    assert est.draft_rate("copy") < 0.2


class PromptFeedingDrafts(RightDrafts):
    """A draft model's timing: its prediction prices the tokens the target accepted since the last proposal, 1 ms; a
    request's first proposal also feeds the draft its prompt, 10 ms."""

    def __init__(self, clock: ShapeClock) -> None:
        self.clock, self.seen = clock, set()

    def propose(self, batch):
        for r in batch:
            self.clock.t += 0.001 if r.request_id in self.seen else 0.010
            self.seen.add(r.request_id)
        return super().propose(batch)

    def forget(self, request_ids):
        self.seen.difference_update(request_ids)

    def predict_seconds(self, ks, contexts):
        return 0.001 * len(ks)


def test_a_request_s_first_proposal_feeding_its_prompt_does_not_inflate_the_draft_s_price():
    # The measured-over-predicted ratio scales every later price of drafting: a prompt's prefill in the draft, which
    # the per-step prediction never meant to price, once per request, doubled it and turned adaptive to k = 0.
    clock = ShapeClock(0.0)
    spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=4), PromptFeedingDrafts(clock),
                       max_model_len=1000, clock=clock)
    engine = LLMEngine(TimedVerifier(clock), SchedulerConfig(max_num_batched_tokens=512, block_size=4), max_model_len=1000,
                       vocab_size=100000, clock=clock, speculator=spec)
    for i in range(6):
        engine.add_request(f"r{i}", [10, 11], SamplingParams(max_tokens=30))
        run_to_completion(engine)
    assert spec.draft_scale == pytest.approx(1.0)


class SplitKernelClock(ShapeClock):
    """A CPU step as the runner computes it: decode rows (a decode's one position, a verification's k + 1) in the
    row-streaming matmul kernel at 0.25 ms a position, prompt chunks in a GEMM at 10 us a token, 1 ms a step."""

    def run(self, plan) -> None:
        decode = sum(s.num_new_tokens for s in plan.scheduled if s.num_new_tokens == 1 or s.spec_token_ids)
        prompt = sum(s.num_new_tokens for s in plan.scheduled) - decode
        self.t += 0.001 + 0.00025 * decode + 0.00001 * prompt


class AllOrNothingDrafts(RightDrafts):
    """A copy-heavy workload's drafts: all right on every other proposal for a request, wrong from the first on the
    rest. Verifying 4 drafts yields 3 tokens on average, at 5 positions' cost: it does not pay beside 8 rows."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}

    def propose(self, batch):
        out = []
        for r, right in zip(batch, super().propose(batch)):
            n = self.asked[r.request_id] = self.asked.get(r.request_id, 0) + 1
            out.append(right if n % 2 else [t + 10**6 for t in right])
        return out


def closed_loop_seconds(k_policy: str | None, num_requests: int = 128) -> float:
    """Virtual seconds to serve `num_requests` requests (200-token prompts, 48 tokens out) 8 at a time, each next one
    arriving as one finishes: most steps carry a prompt chunk beside the decodes, some do not."""
    clock = SplitKernelClock(0.0)
    spec = None
    if k_policy:
        spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=4, k_policy=k_policy),
                           AllOrNothingDrafts(), max_model_len=1000, clock=clock)
    verifier = TimedVerifier(clock)
    verifier.num_kv_blocks = 8 * 256 // 8  # room for every running request: no preemption
    engine = LLMEngine(verifier, SchedulerConfig(max_num_batched_tokens=512, block_size=8),
                       max_model_len=1000, vocab_size=10**7, clock=clock, speculator=spec, predictor=learning_predictor())
    queued = [(f"r{i}", [1000 * (i + 1) + j for j in range(200)]) for i in range(num_requests)]
    for request_id, prompt in queued[:8]:
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=48))
    queued = queued[8:]
    finished = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished += 1
                assert out.outputs[0].token_ids == [out.prompt_token_ids[-1] + 1 + i for i in range(48)]
                if queued:
                    engine.add_request(*queued.pop(0), SamplingParams(max_tokens=48))
    assert finished == num_requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return clock.t


def test_adaptive_serves_a_closed_loop_no_slower_where_verifying_does_not_pay_beside_its_prompt_chunks():
    # The drafts' price is what they add to the decode rows: a prompt chunk in the same step is computed apart (and
    # prefilled whatever k is), so beside one a verification is no cheaper than without.
    off, fixed, adaptive = (closed_loop_seconds(p) for p in (None, "fixed", "adaptive"))
    assert fixed > 1.1 * off  # k = 4 on every step: verifying does not pay here
    # 3%: the ~30 steps a fresh engine verifies on the default model's prices, and its explorations (1.017 measured;
    # priced beside the chunk, 1.050).
    assert adaptive <= 1.03 * off
