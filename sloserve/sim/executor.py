"""SimulatedExecutor: runs no model; advances the virtual clock by the predicted step time."""
from __future__ import annotations

from sloserve.engine.cost import StepTimeModel
from sloserve.engine.features import StepShape
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.sim.clock import VirtualClock


class SimulatedExecutor:
    """Implements the engine's Executor protocol, so the real LLMEngine and Scheduler drive it.

    The engine's own work (scheduling, stop checks, outputs) runs for real but costs no virtual time,
    so the step-time model's overhead terms charge it here, on the step that causes it, and
    `seconds_per_waiting` the policy's ranking of every waiting request (measured by the profiler).
    """

    def __init__(self, model: StepTimeModel, clock: VirtualClock, num_kv_blocks: int, token_id: int = 0,
                 seconds_per_waiting: float = 0.0) -> None:
        self.model = model
        self.seconds_per_waiting = seconds_per_waiting
        self.clock = clock
        self.num_kv_blocks = num_kv_blocks
        # Requests run with ignore_eos and max_tokens = their output length, so this token never
        # ends one early, whichever id it is.
        self.token_id = token_id
        self.num_steps = 0
        self.busy_seconds = 0.0
        self.first_scheduled: list[str] = []  # request ids in the order the scheduler first ran them
        self._seen: set[str] = set()

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        seconds = self.model.step_seconds(StepShape.of(plan)) + self.seconds_per_waiting * plan.num_waiting_ranked
        self.clock.advance(seconds)
        self.num_steps += 1
        self.busy_seconds += seconds
        for s in plan.scheduled:
            if s.request_id not in self._seen:
                self._seen.add(s.request_id)
                self.first_scheduled.append(s.request_id)
        self._seen.difference_update(plan.finished_request_ids)
        return [[self.token_id] if s.samples else [] for s in plan.scheduled]
