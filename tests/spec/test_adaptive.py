"""Adaptive speculation length: the k with the most expected tokens per predicted second, 0 under heavy load."""
import pytest

from sloserve.engine.features import StepShape
from sloserve.spec.adaptive import AcceptanceEstimator, choose_k, expected_tokens


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


def test_light_load_and_good_drafts_speculate_fully():
    assert pick(batch=1, alpha=0.8) == 4


def test_heavy_load_falls_to_no_speculation():
    assert pick(batch=32, alpha=0.8) == 0


def test_poor_acceptance_does_not_speculate():
    assert pick(batch=1, alpha=0.0) == 0


def test_the_draft_cost_counts():
    assert pick(batch=1, alpha=0.6, draft=lambda ks, cs: 0.008 * max(ks)) < pick(batch=1, alpha=0.6)


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
