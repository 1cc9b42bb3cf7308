"""What verification steps cost against the step-time predictor's price for them, per k, and when to run one to see.

Why: the engine's predictor is one linear fit over every step it has run. A verification row (k + 1 tokens on a
long context) shares its features with a prefill chunk on cached context, and its batch size (k + 1 tokens a row)
lands between token-count knots that decode-only steps never reach, so while adaptive speculation chooses k = 0 the
fit prices verifications from the few prefill steps it saw: on the bundled pair at 4 concurrent it priced a k = 4
verification at ~9x a decode step against ~1.4x measured, so adaptive kept k = 0, which never showed the fit a
verification. So per k the measured / predicted seconds of its verification steps, over the same ratio of steps
without drafts, corrects the price of that k, and after `explore_every` decoding steps without a verification one
step verifies (the k > 0 the corrected prices favour), so the ratios stay measured. A k not yet measured borrows the
nearest measured k's ratio. Where verifying truly loses (a loaded server), each exploration doubles the wait for the
next, up to `max_interval` steps: there one k = 4 verification of 32 rows costs ~5 decode steps, so exploring every
64 steps would cost ~3% of throughput, every 1024 steps ~0.2%.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEADBAND = 0.1


@dataclass(slots=True)
class VerifyCost:
    explore_every: int = 64
    max_interval: int = 1024
    weight: float = 0.1  # running averages: one step on a loaded machine must not swing the choice
    decode_ratio: float | None = None  # measured / predicted, steps without drafts
    verify_ratios: dict[int, float] = field(default_factory=dict)  # k -> measured / predicted of its verifications
    since_verify: int = 0  # decoding steps since the last verification
    interval: int = 64  # decoding steps without a verification before the next exploration

    def observe(self, k: int, measured: float, predicted: float) -> None:
        """A decoding step that verified up to k drafts a request (k = 0: none) took `measured` seconds."""
        if measured <= 0 or predicted <= 0:
            return
        # Bounded: a fit that priced a shape near zero (it happens early, or on a noisy machine) is one outlier,
        # not a 10,000x correction.
        ratio = min(max(measured / predicted, 0.1), 10.0)
        if k:
            before = self.verify_ratios.get(k)
            self.verify_ratios[k] = ratio if before is None else before + self.weight * (ratio - before)
            self.since_verify = 0
        else:
            before = self.decode_ratio
            self.decode_ratio = ratio if before is None else before + self.weight * (ratio - before)
            self.since_verify += 1

    def scale(self, k: int) -> float:
        """Factor on the predictor's price of a k-draft verification step, relative to its price of a step without."""
        if k == 0 or not self.verify_ratios or self.decode_ratio is None:
            return 1.0
        nearest = min(self.verify_ratios, key=lambda m: (abs(m - k), m))
        scale = self.verify_ratios[nearest] / self.decode_ratio
        # Within the predictor's own error the price stands: acting on a 0.03% difference flipped a knife-edge
        # choice into 20 verifications at 5% acceptance (the simulator, where measured = predicted). The
        # correction is for gross mis-pricing (~6-9x).
        return 1.0 if abs(scale - 1.0) < DEADBAND else scale

    def chose(self, k: int) -> None:
        """The prices chose k for a step: a verification chosen on its own restarts the exploring at its quickest."""
        if k:
            self.interval = self.explore_every

    def explore(self) -> bool:
        """Whether this decoding step (the prices chose k = 0) should verify: none did for `interval` steps."""
        if self.since_verify < self.interval:
            return False
        self.interval = min(2 * self.interval, self.max_interval)
        return True

    def __post_init__(self) -> None:
        self.interval = self.explore_every
