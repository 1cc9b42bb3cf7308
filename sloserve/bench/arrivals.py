"""Arrival processes: when each request is sent, as offsets in seconds from the benchmark start."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARRIVAL_KINDS = ("burst", "constant", "poisson", "gamma", "trace")


@dataclass(slots=True)
class Arrivals:
    """An open-loop arrival process.

    burst     every request at t=0 (vLLM's --request-rate inf); combine with a
              max concurrency for a closed loop (1 == synchronous).
    constant  one request every 1/rate seconds.
    poisson   exponential gaps with mean 1/rate (gamma with burstiness 1).
    gamma     gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)) as in
              vLLM: mean gap 1/rate, burstiness < 1 is burstier than Poisson.
    trace     the offsets recorded in a trace, shifted so the first is 0.

    As in vLLM the first request goes at t=0 and request i after i gaps.
    """

    kind: str = "burst"
    rate: float = math.inf
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"arrival kind must be one of {ARRIVAL_KINDS}, got {self.kind!r}")
        if not self.rate > 0:
            raise ValueError(f"request rate must be > 0, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    def offsets(self, n: int, rng: np.random.Generator, trace: list[float] | None = None) -> list[float]:
        if self.kind == "trace":
            if trace is None:
                raise ValueError("trace arrivals need the trace's offsets")
            start = min(trace[:n], default=0.0)
            return [t - start for t in trace[:n]]
        if n <= 0:
            return []
        if self.kind == "burst" or math.isinf(self.rate):
            return [0.0] * n
        if self.kind == "constant":
            return [i / self.rate for i in range(n)]  # not a cumsum: no rounding drift
        shape = 1.0 if self.kind == "poisson" else self.burstiness
        gaps = rng.gamma(shape, 1.0 / (self.rate * shape), size=n - 1)
        return [0.0] + [float(x) for x in np.cumsum(gaps)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rate": _num_out(self.rate), "burstiness": self.burstiness}

    @classmethod
    def from_dict(cls, d: dict) -> Arrivals:
        return cls(kind=d["kind"], rate=_num_in(d["rate"]), burstiness=d["burstiness"])


def _num_out(x: float) -> float | str:
    # JSON has no infinity; "inf" keeps the results file strict JSON.
    return "inf" if math.isinf(x) else x


def _num_in(x: float | str) -> float:
    return float(x)
