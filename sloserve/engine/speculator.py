"""The Speculator seam: proposes draft tokens before a step and learns from their verification."""
from __future__ import annotations

from typing import Protocol

from sloserve.engine.cost import StepTimeModel
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.request import Request


class Speculator(Protocol):
    def propose(self, running: list[Request], predictor: StepTimeModel) -> dict[str, list[int]]:
        """Draft tokens per running request for the coming step (the scheduler spends budget on them)."""
        ...

    def observe(self, plan: SchedulerOutput, sampled: list[list[int]]) -> None:
        """What the step's verifications accepted."""
        ...

    def forget(self, request_ids: list[str]) -> None:
        """Requests that ended or were preempted."""
        ...
