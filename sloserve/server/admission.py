"""Admission control in front of the engine: a draining state (503), a bounded waiting queue (429) and,
with `--admission slo`, a refusal (429) of requests predicted to miss their TTFT objective."""
from __future__ import annotations

from dataclasses import dataclass

from sloserve.engine.admission import TTFTAdmission
from sloserve.engine.async_engine import AsyncLLMEngine
from sloserve.request import Request, SamplingParams, SLO
from sloserve.server.errors import APIError

ADMISSION_MODES = ("none", "queue", "slo")


@dataclass(slots=True)
class AdmissionLimits:
    max_waiting_requests: int = 256
    max_waiting_tokens: int = 131072
    retry_after_s: int = 1
    mode: str = "queue"  # none: no caps; queue: the caps above; slo: the caps and predicted TTFT

    def __post_init__(self) -> None:
        if self.mode not in ADMISSION_MODES:
            raise ValueError(f"unknown admission {self.mode!r}; choose from {', '.join(ADMISSION_MODES)}")


class Admission:
    """Refuses work the engine could only queue without bound, or (mode slo) could only serve late.

    Only the waiting queue is bounded: running requests are already bounded by max_num_seqs and
    the KV cache, and a queue that grows without limit turns overload into unbounded TTFT for all.
    """

    def __init__(self, engine: AsyncLLMEngine, limits: AdmissionLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.draining = False
        self.ttft: TTFTAdmission | None = None
        if limits.mode == "slo":
            core = engine.engine
            self.ttft = TTFTAdmission(core.predictor, core.config.policy, core.config.max_num_batched_tokens)
            engine.track_load = True

    def check(self, num_prompt_tokens: int) -> None:
        """Raise the APIError the client should get, or return if the request may be queued."""
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests", code="shutting_down")
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_stopped")
        if self.limits.mode == "none":
            return
        # A burst that free running slots will take at the next step is not a queue.
        waiting = self.engine.num_waiting - self.engine.num_free_slots
        if waiting >= self.limits.max_waiting_requests:
            raise self._overloaded(f"{waiting} requests are already waiting (limit {self.limits.max_waiting_requests})")
        tokens = self.engine.num_waiting_tokens
        # An empty queue admits any single prompt: the model-length check already bounds it.
        if waiting > 0 and tokens + num_prompt_tokens > self.limits.max_waiting_tokens:
            raise self._overloaded(
                f"{tokens} prompt tokens are already waiting and this request adds {num_prompt_tokens} "
                f"(limit {self.limits.max_waiting_tokens})"
            )

    def predict_ttft(self, prompt_token_ids: list[int], params: SamplingParams, priority: int,
                     slo: SLO | None) -> float | None:
        """With mode slo: the predicted TTFT, or a 429 when it exceeds the request's TTFT objective."""
        if self.ttft is None:
            return None
        candidate = Request("admission-candidate", prompt_token_ids, params, self.engine.engine.clock.now(), priority, slo)
        # Requests accepted but not yet in the engine are counted as ahead of this one.
        pending = self.engine.num_waiting_tokens - self.engine.stats.num_waiting_tokens
        verdict = self.ttft.check(self.engine.load, candidate, pending)
        if verdict.reject is not None:
            raise APIError(429, f"the request would miss its latency objective: {verdict.reject}; retry later",
                           code="slo_unattainable", headers={"Retry-After": str(verdict.retry_after_s)})
        return verdict.predicted_ttft

    def _overloaded(self, why: str) -> APIError:
        return APIError(
            429, f"the server is overloaded: {why}; retry later", code="queue_full",
            headers={"Retry-After": str(self.limits.retry_after_s)},
        )
