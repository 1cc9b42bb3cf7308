"""VirtualClock: simulated time that moves only when the simulator says so."""
from __future__ import annotations


class VirtualClock:
    """Satisfies the engine's Clock protocol; the SimulatedExecutor and the driver move it forward."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time cannot run backwards (advance by {seconds})")
        self._now += seconds

    def advance_to(self, t: float) -> None:
        """Jump across an idle gap; never moves backwards (a late arrival is simply now)."""
        if t > self._now:
            self._now = t
