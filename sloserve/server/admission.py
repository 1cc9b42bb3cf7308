"""Admission control: a bounded waiting queue (429) and a draining state (503) in front of the engine."""
from __future__ import annotations

from dataclasses import dataclass

from sloserve.engine.async_engine import AsyncLLMEngine
from sloserve.server.errors import APIError


@dataclass(slots=True)
class AdmissionLimits:
    max_waiting_requests: int = 256
    max_waiting_tokens: int = 131072
    retry_after_s: int = 1


class Admission:
    """Refuses work the engine could only queue without bound.

    Only the waiting queue is bounded: running requests are already bounded by max_num_seqs and
    the KV cache, and a queue that grows without limit turns overload into unbounded TTFT for all.
    """

    def __init__(self, engine: AsyncLLMEngine, limits: AdmissionLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.draining = False

    def check(self, num_prompt_tokens: int) -> None:
        """Raise the APIError the client should get, or return if the request may be queued."""
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests", code="shutting_down")
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_stopped")
        # A burst that free running slots will take at the next step is not a queue.
        waiting = self.engine.num_waiting - self.free_running_slots
        if waiting >= self.limits.max_waiting_requests:
            raise self._overloaded(f"{waiting} requests are already waiting (limit {self.limits.max_waiting_requests})")
        tokens = self.engine.num_waiting_tokens
        # An empty queue admits any single prompt: the model-length check already bounds it.
        if waiting > 0 and tokens + num_prompt_tokens > self.limits.max_waiting_tokens:
            raise self._overloaded(
                f"{tokens} prompt tokens are already waiting and this request adds {num_prompt_tokens} "
                f"(limit {self.limits.max_waiting_tokens})"
            )

    @property
    def free_running_slots(self) -> int:
        return max(0, self.engine.engine.scheduler.max_num_seqs - self.engine.stats.num_running)

    def _overloaded(self, why: str) -> APIError:
        return APIError(
            429, f"the server is overloaded: {why}; retry later", code="queue_full",
            headers={"Retry-After": str(self.limits.retry_after_s)},
        )
