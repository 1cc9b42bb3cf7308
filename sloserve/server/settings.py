"""ServerSettings: what the HTTP layer adds on top of the engine's configuration."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.server.admission import AdmissionLimits
from sloserve.server.guard import GuardSettings
from sloserve.slo_classes import SLOClasses

DEFAULT_MAX_TOKENS_CAP = 4096


@dataclass(slots=True)
class ServerSettings:
    # The first name is the one reported; any of them is accepted in a request's `model`.
    served_model_names: list[str]
    max_body_bytes: int = 4 << 20
    max_tokens_cap: int | None = None  # None: min(DEFAULT_MAX_TOKENS_CAP, max_model_len)
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    shutdown_grace_s: float = 30.0
    guard: GuardSettings = field(default_factory=GuardSettings)
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no cross-origin reads
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    max_output_tokens_per_key: int | None = None  # None: no per-key budget
    slo_classes: SLOClasses = field(default_factory=SLOClasses)
    metrics_compat: str = "none"  # "vllm": /metrics also exports vLLM's series under their vllm: names

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be positive, got {self.max_tokens_cap}")
        if self.metrics_compat not in ("none", "vllm"):
            raise ValueError(f"metrics compat must be none or vllm, got {self.metrics_compat!r}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be positive, got {self.body_timeout_s}")
        if self.max_output_tokens_per_key is not None and self.max_output_tokens_per_key < 1:
            raise ValueError(f"max_output_tokens_per_key must be positive, got {self.max_output_tokens_per_key}")
        if self.admission.max_waiting_requests < 1 or self.admission.max_waiting_tokens < 1:
            raise ValueError("the admission limits must be positive")

    def tokens_cap(self, max_model_len: int) -> int:
        return min(self.max_tokens_cap or DEFAULT_MAX_TOKENS_CAP, max_model_len)
