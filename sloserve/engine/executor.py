"""The Executor seam: whatever runs a step's plan (a real model, or a cost model on a virtual clock)."""
from __future__ import annotations

from typing import Protocol

from sloserve.engine.scheduler import SchedulerOutput


class Executor(Protocol):
    num_kv_blocks: int  # KV capacity this executor holds, in blocks of the engine's block size

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        """Run one step; return, per scheduled request, its sampled tokens (empty: mid-prefill)."""
        ...
