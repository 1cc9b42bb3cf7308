"""What a verification step costs against the step-time predictor's price for it, and when to run one to find out.

Why: the engine's predictor is one linear fit over every step it has run. A verification row (k + 1 tokens on a
long context) shares its features with a prefill chunk on cached context, so while adaptive speculation chooses
k = 0 the fit prices verifications from the few prefill steps it saw; on the bundled pair at 4 concurrent that
priced a k = 4 verification at ~9x a decode step against ~1.4x measured, and adaptive kept choosing k = 0, which
in turn never showed the fit a verification. So: measured / predicted seconds of verification steps over the same
ratio of steps without drafts corrects the price of every k > 0 candidate, and after `explore_every` decoding steps
without a verification one step drafts a single token (k = 1: the cheapest verification, never far from a decode)
so the ratio stays measured.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class VerifyCost:
    explore_every: int = 64
    weight: float = 0.1  # running average: one step on a loaded machine must not swing the choice
    decode_ratio: float | None = None  # measured / predicted, steps without drafts
    verify_ratio: float | None = None  # measured / predicted, steps with at least one verification
    since_verify: int = 0  # decoding steps since the last verification

    def observe(self, verified: bool, measured: float, predicted: float) -> None:
        if measured <= 0 or predicted <= 0:
            return
        ratio = measured / predicted
        if verified:
            self.verify_ratio = self._average(self.verify_ratio, ratio)
            self.since_verify = 0
        else:
            self.decode_ratio = self._average(self.decode_ratio, ratio)
            self.since_verify += 1

    def _average(self, running: float | None, ratio: float) -> float:
        return ratio if running is None else running + self.weight * (ratio - running)

    @property
    def scale(self) -> float:
        """Factor on the predictor's price of a verification step, relative to its price of a step without drafts."""
        if self.verify_ratio is None or self.decode_ratio is None:
            return 1.0
        return self.verify_ratio / self.decode_ratio

    def explore(self) -> bool:
        """Whether this decoding step should verify one draft token: none was verified for `explore_every` steps."""
        return self.since_verify >= self.explore_every
