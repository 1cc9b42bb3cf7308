"""The clock seam: the engine reads time only through an injected Clock."""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic timeline (wall-clock or virtual)."""
        ...


class MonotonicClock:
    """Real time for a real executor."""

    def now(self) -> float:
        return time.perf_counter()
