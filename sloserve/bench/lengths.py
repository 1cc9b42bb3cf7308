"""Token-length distributions for synthetic workloads: fixed, uniform, normal, lognormal, clipped."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LENGTH_KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(slots=True)
class LengthDist:
    """Integer token lengths around `mean`, clipped to [min, max].

    `spread` is one knob for every non-fixed kind so a user can switch kinds
    without re-deriving parameters:
      uniform    integers in [int(mean*(1-spread)), int(mean*(1+spread))]
                 (exactly vLLM's --random-range-ratio; spread 0 == fixed),
      normal     std = spread * mean,
      lognormal  coefficient of variation = spread (mean and std match the
                 normal's before clipping; the tail is long on the right).
    Clipping happens after rounding, so a clipped distribution's mean may
    move away from `mean`.
    """

    mean: int
    kind: str = "uniform"
    spread: float = 0.0
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length distribution must be one of {LENGTH_KINDS}, got {self.kind!r}")
        if self.mean < 0 or self.spread < 0:
            raise ValueError("length mean and spread must be >= 0")
        if self.kind == "uniform" and self.spread >= 1:
            raise ValueError("uniform spread (range ratio) must be in [0, 1)")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"length max {self.max} < min {self.min}")

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        raw = self._raw(n, rng)
        upper = self.max if self.max is not None else np.iinfo(np.int64).max
        return [int(x) for x in np.clip(np.rint(raw), self.min, upper).astype(np.int64)]

    def _raw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed" or self.spread == 0 or self.mean == 0:
            return np.full(n, float(self.mean))
        if self.kind == "uniform":
            low = int(self.mean * (1 - self.spread))
            high = int(self.mean * (1 + self.spread))
            return rng.integers(low, high + 1, size=n).astype(float)
        if self.kind == "normal":
            return rng.normal(self.mean, self.spread * self.mean, size=n)
        sigma2 = math.log1p(self.spread**2)  # moment-matched: E[X]=mean, CV=spread
        return rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), size=n)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "kind": self.kind, "spread": self.spread, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict) -> LengthDist:
        return cls(**d)
