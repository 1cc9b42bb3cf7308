"""SpeculativeConfig: vLLM's `speculative_config` dictionary (JSON on the command line), checked up front."""
from __future__ import annotations

import json
from dataclasses import dataclass

METHODS = ("ngram", "draft_model")
K_POLICIES = ("fixed", "adaptive")
# vLLM's keys, plus sloserve's "k_policy" (how many of the K drafts a step uses).
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model", "k_policy"}


@dataclass(slots=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model's directory (method draft_model)
    # fixed: every step drafts K tokens per request; adaptive: each step picks k in 0..K for the
    # batch that maximises predicted goodput (SmartSpec), so a loaded server stops speculating.
    k_policy: str = "fixed"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if self.k_policy not in K_POLICIES:
            raise ValueError(f"speculative_config: k_policy must be one of {', '.join(K_POLICIES)}, got {self.k_policy!r}")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config: method 'ngram' takes no 'model'")
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ValueError(
                    "speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                    f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
                )
        elif not self.model:
            raise ValueError("speculative_config: method 'draft_model' needs 'model' (the draft model's directory)")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From LLM(speculative_config=...) or --speculative-config: a dict, its JSON text, or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ValueError(f"speculative_config: unsupported key(s) {', '.join(unknown)}; supported: {', '.join(sorted(_KEYS))}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        return cls(**value)
