"""Max goodput rate (DistServe): the highest arrival rate whose SLO attainment stays >= a target."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class SweepConfig:
    target: float = 0.9  # attainment to hold
    start_rate: float = 1.0  # first rate probed (req/s)
    min_rate: float = 0.01  # give up below this
    max_rate: float = 1024.0  # never probe above this
    max_probes: int = 10  # runs in all, search and bisection together
    rel_tol: float = 0.05  # stop when (hi - lo) / hi <= rel_tol

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError("attainment target must be in (0, 1]")
        if not 0 < self.min_rate <= self.start_rate <= self.max_rate:
            raise ValueError("need 0 < min_rate <= start_rate <= max_rate")


@dataclass(slots=True)
class SweepResult:
    max_rate: float | None  # highest rate probed that met the target; None if none did
    upper_rate: float | None  # lowest rate probed that missed it (capacity lies between)
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment) in probe order


def find_max_goodput_rate(probe: Callable[[float], float], cfg: SweepConfig) -> SweepResult:
    """Bracket the capacity by doubling or halving from start_rate, then bisect.

    `probe(rate)` runs the workload at `rate` and returns its attainment.
    Assumes attainment falls as the rate rises; with noise the answer is the
    best rate *seen* meeting the target below the lowest rate seen missing it.
    """
    out = SweepResult(None, None)

    def meets(rate: float) -> bool:
        a = probe(rate)
        out.probes.append((rate, a))
        return a >= cfg.target

    lo, hi = None, None
    rate = cfg.start_rate
    while len(out.probes) < cfg.max_probes:  # bracket
        if meets(rate):
            lo = rate
            if hi is not None or rate >= cfg.max_rate:
                break
            rate = min(rate * 2, cfg.max_rate)
        else:
            hi = rate
            if lo is not None or rate <= cfg.min_rate:
                break
            rate = max(rate / 2, cfg.min_rate)
    while lo is not None and hi is not None and len(out.probes) < cfg.max_probes and (hi - lo) > cfg.rel_tol * hi:
        mid = (lo + hi) / 2
        if meets(mid):
            lo = mid
        else:
            hi = mid
    out.max_rate, out.upper_rate = lo, hi
    return out
