"""Adaptive speculation length: the k with the most expected tokens per predicted second, 0 under heavy load; the
verification cost it measures corrects the predictor's price of a verification."""
import pytest

from sloserve.engine.engine import LLMEngine
from sloserve.engine.features import StepShape
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SamplingParams
from sloserve.spec.adaptive import AcceptanceEstimator, choose_k, expected_tokens, totals_by_k
from sloserve.spec.config import SpeculativeConfig
from sloserve.spec.speculation import Speculation
from sloserve.spec.verify_cost import VerifyCost
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


def pick(batch, alpha, max_k=4, draft=lambda ks, cs: 0.0, prefill=0):
    return choose_k(max_k, [max_k] * batch, [100] * batch, [alpha] * batch, prefill, 512, ComputeBound(), draft)


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_totals_by_k_sum_each_rows_expected_tokens_up_to_its_limit():
    alphas, limits, rates = [0.5, 0.9, 1.0, 0.7], [4, 2, 3, 0], [1.0, 0.5, 1.0, 1.0]
    tokens, rows, drafts = totals_by_k(4, limits, alphas, rates)
    for k in range(5):
        xs = [min(k, limit) for limit in limits]
        assert tokens[k] == pytest.approx(sum(m * expected_tokens(a, x) + 1 - m if x else 1.0
                                              for a, x, m in zip(alphas, xs, rates)))
        assert rows[k] == pytest.approx(sum(m for x, m in zip(xs, rates) if x))
        assert drafts[k] == pytest.approx(sum(m * x for x, m in zip(xs, rates)))


def test_light_load_and_good_drafts_speculate_fully():
    assert pick(batch=1, alpha=0.8) == 4


def test_heavy_load_falls_to_no_speculation():
    assert pick(batch=32, alpha=0.8) == 0


def test_poor_acceptance_does_not_speculate():
    assert pick(batch=1, alpha=0.0) == 0


def test_the_draft_cost_counts():
    assert pick(batch=1, alpha=0.6, draft=lambda ks, cs: 0.008 * max(ks)) < pick(batch=1, alpha=0.6)


def test_rows_that_find_no_draft_yield_one_token_so_a_low_draft_rate_does_not_buy_speculation():
    # 8 rows at acceptance 0.7: one draft each wins while every row drafts (n-gram rows without a match draft
    # nothing and yield only their own token)...
    def choose(rate):
        return choose_k(4, [4] * 8, [100] * 8, [0.7] * 8, 0, 512, ComputeBound(), lambda ks, cs: 0.0, draft_rates=[rate] * 8)

    assert choose(1.0) == 1
    assert choose(0.2) == 0


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
    assert choose_k(4, [4], [150], [0.0], 0, 512, fit, lambda ks, cs: 0.0) == 0


def test_drafts_that_would_displace_a_prefill_chunk_are_priced_with_it():
    # 32 rows beside a long waiting prompt: k = 4's drafts take 128 of the budget's tokens from the prefill chunk,
    # which keeps the step's tokens (and its price) about k = 0's. That prefill is deferred, not saved: priced with
    # the chunk k = 0's step carries, the verification is as dear as it is on a loaded server with nothing waiting.
    assert pick(batch=32, alpha=0.8, prefill=0) == 0
    assert pick(batch=32, alpha=0.8, prefill=4000) == 0


def test_a_measured_verification_replaces_a_fit_that_overprices_it():
    # The fit prices any multi-token row like a prefill chunk (9x a decode step); the steps measured say a decode
    # costs its price and a verification of 4 drafts on each of 4 rows adds 0.1 ms.
    fit = OverpricedVerification()
    cost = VerifyCost()
    args = (4, [4] * 4, [220] * 4, [0.8] * 4, 0, 512, fit, lambda ks, cs: 0.0)
    assert choose_k(*args, cost) == 0
    cost.observe_decode(0.001, 0.001)
    cost.observe_verify(0.0011, 0.001, batch=4, rows=4, drafts=16)
    assert cost.added_seconds(4, 4, 16) == pytest.approx(0.0001)
    assert choose_k(*args, cost) == 4


def test_verify_cost_fits_a_cost_per_verifying_row_and_per_draft():
    cost = VerifyCost()
    for _ in range(3):
        cost.observe_decode(0.002, 0.001)  # decodes measure twice their price
    assert cost.decode_ratio == pytest.approx(0.002 / 0.001)
    per_row, per_draft = 0.0005, 0.0001
    for rows, drafts in ((4, 16), (8, 8), (2, 4)):
        cost.observe_verify(0.002 + per_row * rows + per_draft * drafts, 0.001, 8, rows, drafts)
    fit = cost.added[4]  # batches of 8 to 15 rows
    assert fit.per_row == pytest.approx(per_row) and fit.per_draft == pytest.approx(per_draft)
    assert cost.added_seconds(8, 6, 24) == pytest.approx(6 * per_row + 24 * per_draft)


def test_verify_cost_keeps_the_latest_verifications_and_never_prices_drafts_below_zero():
    cost = VerifyCost(window=2)
    cost.observe_decode(0.002, 0.002)
    cost.observe_verify(0.001, 0.002, batch=4, rows=4, drafts=16)  # measured under its decode price: noise, not a saving
    assert cost.added_seconds(4, 4, 16) == 0.0
    cost.observe_verify(0.003, 0.002, batch=4, rows=4, drafts=16)
    cost.observe_verify(0.003, 0.002, batch=4, rows=4, drafts=16)  # the first has left the window
    assert cost.added_seconds(4, 4, 16) == pytest.approx(0.001)
    cost.observe_verify(0.0, 0.002, batch=4, rows=4, drafts=16)  # a step that measured nothing is not evidence
    assert len(cost.added[3].verifications) == 2


def test_verify_cost_is_fitted_per_batch_size_class_and_an_unmeasured_class_borrows_the_nearest_larger():
    cost = VerifyCost()
    cost.observe_decode(0.010, 0.010)
    cost.observe_verify(0.012, 0.010, batch=16, rows=16, drafts=64)  # beside 16 decodes a draft is cheap
    cost.observe_verify(0.060, 0.020, batch=32, rows=32, drafts=128)  # beside 32 the CPU is compute-bound
    assert cost.added_seconds(16, 16, 64) == pytest.approx(0.002)
    assert cost.added_seconds(32, 32, 128) == pytest.approx(0.040)
    assert cost.added_seconds(20, 10, 40) == pytest.approx(0.002 * 10 / 16)  # 16..31: the 16-row fit
    assert cost.added_seconds(2, 2, 8) == pytest.approx(0.002 * 2 / 16)  # not measured: the nearest larger is 16..31's
    assert cost.measured(2) and cost.measured(63)
    assert not cost.measured(64)  # only smaller batches measured: no guide, the predictor's price stands


def test_a_batch_larger_than_any_measured_verification_is_priced_by_the_predictor_not_a_smaller_batch_s_fit():
    cost = VerifyCost()
    cost.observe_decode(0.001, 0.001)
    cost.observe_verify(0.0011, 0.001, batch=1, rows=1, drafts=4)  # beside one row, 4 drafts add 0.1 ms
    assert choose_k(4, [4], [220], [0.8], 0, 512, OverpricedVerification(), lambda ks, cs: 0.0, cost) == 4
    # 32 rows: the fit priced them like a prefill chunk (9x a decode step); the one-row fit does not say otherwise.
    assert choose_k(4, [4] * 32, [220] * 32, [0.8] * 32, 0, 512, OverpricedVerification(), lambda ks, cs: 0.0, cost) == 0


def test_the_decode_ratio_averages_slowly_and_is_bounded():
    cost = VerifyCost(weight=0.1)
    cost.observe_decode(0.002, 0.002)
    cost.observe_decode(0.004, 0.002)  # one slow step moves the average a tenth of the way
    assert cost.decode_ratio == pytest.approx(1.1)
    cost.observe_decode(0.010, 1e-9)  # a fit that priced the shape at ~0: one outlier, at most 10x
    assert cost.decode_ratio == pytest.approx(1.1 + 0.1 * (10.0 - 1.1))


def test_verify_cost_explores_after_enough_steps_without_a_verification():
    cost = VerifyCost(explore_every=3)
    for _ in range(2):
        cost.observe_decode(0.001, 0.001)
        assert not cost.explore()
    cost.observe_decode(0.001, 0.001)
    assert cost.explore()
    cost.observe_verify(0.001, 0.001, batch=1, rows=1, drafts=3)
    assert not cost.explore()


def test_each_exploration_doubles_the_wait_until_a_verification_is_chosen():
    cost = VerifyCost(explore_every=2, max_interval=8)
    waits = []
    for _ in range(5):
        steps = 0
        while not cost.explore():
            cost.observe_decode(0.001, 0.001)
            steps += 1
        cost.observe_verify(0.001, 0.001, batch=1, rows=1, drafts=1)
        waits.append(steps)
    assert waits == [2, 4, 8, 8, 8]
    cost.chose(2)
    assert cost.interval == 2


class OverpricedVerification:
    """The predictor: 1 ms for a step of one-token rows, 9 ms for any step with a multi-token row; learns nothing."""

    def step_seconds(self, shape: StepShape) -> float:
        return 0.001 if all(n == 1 for n in shape.new_tokens) else 0.009

    def observe(self, shape, seconds) -> None:
        pass


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


def adaptive_run(per_extra_token: float, max_tokens: int = 300):
    clock = ShapeClock(per_extra_token)
    spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=4, k_policy="adaptive"), CountedDrafts(),
                       max_model_len=1000, max_num_batched_tokens=512, clock=clock)
    engine = LLMEngine(TimedVerifier(clock), SchedulerConfig(max_num_batched_tokens=512, block_size=4), max_model_len=1000,
                       vocab_size=100000, clock=clock, speculator=spec, predictor=OverpricedVerification())
    engine.add_request("r", [10, 11], SamplingParams(max_tokens=max_tokens))
    out = run_to_completion(engine)["r"]
    assert out.outputs[0].token_ids == list(range(12, 12 + max_tokens))  # exact whatever k was chosen
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return spec


def test_adaptive_explores_a_verification_measures_it_cheap_and_speculates():
    spec = adaptive_run(per_extra_token=0.00002)  # a verification of 4 drafts: 1.08 ms, priced at 9 ms
    steps = spec.stats.steps_per_k
    # The fit's price holds until one verification is measured (the k the prices favour: K, every draft's worth
    # the same 9 ms); from then on every step verifies K drafts (what one verification added, 0.08 ms, is what
    # drafts cost: per draft, the fit's choice of the two terms that explain one measurement).
    assert steps[0] == spec.verify_cost.explore_every
    assert steps[1] == steps[2] == steps[3] == 0 and steps[4] > 0
    assert spec.verify_cost.added_seconds(1, 1, 4) == pytest.approx(4 * 0.00002)


def test_adaptive_keeps_k_0_when_the_measured_verification_is_as_dear_as_priced():
    spec = adaptive_run(per_extra_token=0.002)  # a k = 4 verification: 9 ms, as priced
    steps = spec.stats.steps_per_k
    # Explorations only, after 64 and then 128 steps without a verification (the first K, which the fit's prices
    # favour; the second the k the measured cost favours); 300 tokens leave no room for the third (256 steps later).
    assert steps[4] >= 1 and sum(steps[1:]) == 2 and spec.verify_cost.interval == 256
    # The proposer was asked for drafts on those two steps only, never while k was 0.
    assert len(spec.proposer.batches) == 2 and all(ks and min(ks) > 0 for ks in spec.proposer.batches)


class LoadClock(ShapeClock):
    """Verifying is cheap beside one or two rows and dear beside more (a CPU's linear layers saturate)."""

    def run(self, plan) -> None:
        extra = sum(s.num_new_tokens - 1 for s in plan.scheduled)
        self.t += 0.001 + (0.00002 if len(plan.scheduled) <= 2 else 0.002) * extra


def test_a_clear_k_0_is_held_without_weighing_and_k_returns_when_the_load_drops(monkeypatch):
    import sloserve.spec.speculation as speculation_module

    weighed = []
    original = speculation_module.candidates
    monkeypatch.setattr(speculation_module, "candidates", lambda *a: weighed.append(len(a[1])) or original(*a))
    clock = LoadClock(0.0)
    spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=4, k_policy="adaptive"), CountedDrafts(),
                       max_model_len=2000, max_num_batched_tokens=512, clock=clock)
    engine = LLMEngine(TimedVerifier(clock), SchedulerConfig(max_num_batched_tokens=512, block_size=32), max_model_len=2000,
                       vocab_size=100000, clock=clock, speculator=spec, predictor=OverpricedVerification())
    params = lambda n: SamplingParams(max_tokens=n)  # noqa: E731
    engine.add_request("long", [10, 11], params(1000))
    trace = []  # (requests running into the step, its k) per step

    def run(steps=None):
        while engine.has_unfinished_requests() and (steps is None or steps > 0):
            rows = len(engine.scheduler.running)
            engine.step()
            trace.append((rows, spec.last_k))
            steps = None if steps is None else steps - 1

    run(100)  # alone: one exploration measures verifying cheap, then every step verifies 4 drafts
    assert trace[-1] == (1, 4)
    for i in range(8):
        engine.add_request(f"short{i}", [1000 * (i + 1)], params(300))
    before = len(weighed)
    run(120)  # 9 rows: verifying measured dear there; k = 0, clearly, mostly held without weighing
    loaded = trace[100:]
    assert loaded[-1] == (9, 0)
    zeros = sum(1 for rows, k in loaded if rows == 9 and k == 0)
    assert zeros > 60 and len(weighed) - before < zeros / 4
    proposals = len(spec.proposer.batches)
    run(40)  # still loaded: the proposer is asked for drafts on the steps that verify, never while k is 0
    assert all(rows == 9 for rows, _ in trace[220:])
    assert len(spec.proposer.batches) - proposals == sum(1 for _, k in trace[220:] if k)
    run()  # the short requests finish: alone again, the long one speculates at once
    alone = [k for rows, k in trace[260:] if rows == 1]
    assert alone[:-1] == [4] * (len(alone) - 1)  # the last: one token left, no room for a draft
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_closed_form_fit_of_what_verifying_adds_is_the_non_negative_least_squares_one():
    import numpy as np

    from sloserve.engine.nnls import nnls
    from sloserve.spec.verify_cost import nonnegative_fit

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 17))
        if trial % 3 == 0:  # one request: every verification one row (drafts vary, or not)
            rows = np.ones(n, int)
            drafts = rng.integers(1, 5, n) if trial % 2 else np.full(n, 4)
        else:
            rows = rng.integers(1, 33, n)
            drafts = rows * rng.integers(1, 5, n) if trial % 5 == 0 else rng.integers(1, 129, n)
        seconds = 1e-4 * rows * rng.uniform(-1, 2) + 1e-5 * drafts * rng.uniform(-1, 2) + rng.normal(0, 1e-4, n)
        points = list(zip(rows.tolist(), drafts.tolist(), seconds.tolist()))
        expected = nnls(np.array([(r, d) for r, d, _ in points], float), seconds)
        assert nonnegative_fit(points) == pytest.approx(tuple(expected), rel=1e-6, abs=1e-12)


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
                       max_model_len=1000, max_num_batched_tokens=512, clock=clock)
    engine = LLMEngine(TimedVerifier(clock), SchedulerConfig(max_num_batched_tokens=512, block_size=4), max_model_len=1000,
                       vocab_size=100000, clock=clock, speculator=spec)
    for i in range(6):
        engine.add_request(f"r{i}", [10, 11], SamplingParams(max_tokens=30))
        run_to_completion(engine)
    assert spec.draft_scale == pytest.approx(1.0)
