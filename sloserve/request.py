"""The request and its parameters: what a user asks for and what the engine tracks about it."""
from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field
from typing import TypedDict

_INT64 = (-(2**63), 2**63 - 1)
_FLOAT32_MIN_NORMAL = 2.0**-126  # ~1.1755e-38


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's further fields (its names, defaults and meaning); applied in model/logits_processors.py.
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # vLLM's: sequences returned for the prompt (siblings sharing its KV blocks, seeded seed + i)
    # vLLM's: the top-k log-probabilities of each generated token (plus the sampled one's), and of each
    # prompt token (None: not computed).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Refuse, naming the parameter, any value the sampler could not honour at its float32 precision."""
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        temperature = _float32("temperature", self.temperature)
        # Below the smallest normal float32, 1/T (how CUDA divides by a scalar) overflows float32.
        if temperature < 0 or 0 < self.temperature < _FLOAT32_MIN_NORMAL:
            raise ValueError(f"temperature must be 0 (greedy) or at least {_FLOAT32_MIN_NORMAL:.4g} (the smallest "
                             f"normal float32), got {self.temperature}")
        top_p = _float32("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (and not round to 0 in float32), got {self.top_p}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= _INT64[1]:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _INT64[0] <= self.seed <= _INT64[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self._validate_vllm_fields()

    def _validate_vllm_fields(self) -> None:
        # vLLM's own ranges for these fields, so a request vLLM refuses is refused here too.
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be None or a non-negative integer, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float32(name: str, value) -> float:
    """`value` as the sampler sees it (float32); a non-number, NaN, inf or a float32 overflow is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except (OverflowError, struct.error):
        rounded = math.inf
    if not math.isfinite(rounded):
        raise ValueError(f"{name} must be a finite float32, got {value}")
    return rounded


@dataclass(slots=True)
class Logprob:
    """vLLM's: one token's log-probability, its rank in the vocabulary (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated token: token id -> Logprob (the sampled token and the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token, the same; None for the first token (nothing precedes it).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class SLO:
    """Latency objectives of one request, in seconds (None: no objective)."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine failed on this request alone; the others went on

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
             RequestStatus.FINISHED_ERROR}


@dataclass(slots=True, eq=False)
class Request:
    """One generation request as the engine tracks it.

    `num_computed_tokens` counts tokens whose keys and values sit in the KV cache; the scheduler
    only ever catches it up with `num_tokens` (vLLM v1's rule), which covers prefill, chunked
    prefill, decode and recompute-after-preemption alike.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower value is served first, as in vLLM
    slo: SLO | None = None
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Leading tokens the prefix cache held when the scheduler last looked (a waiting request does not
    # hold them yet): its prefill starts after them, so policies and admission predict from there.
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    output_text: str = ""
    logprobs: SampleLogprobs | None = None  # kept only when sampling_params.logprobs asks
    prompt_logprobs: PromptLogprobs | None = None  # kept only when sampling_params.prompt_logprobs asks

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None


class TextPrompt(TypedDict):
    """vLLM's text prompt: `{"prompt": "..."}`."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's token prompt: `{"prompt_token_ids": [...]}` (no tokenizer needed)."""

    prompt_token_ids: list[int]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence, as vLLM's: text, token ids, why it ended; plus each token's time.

    The token lists are the request's own, not copies (copying every step would cost O(n^2) over a
    long output): they keep growing until the request finishes.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    token_times: list[float]  # engine clock time at which each token was sampled
    logprobs: SampleLogprobs | None = None  # one dict per token in token_ids (None: not asked)

    @classmethod
    def of(cls, request: Request, index: int = 0) -> CompletionOutput:
        return cls(index=index, text=request.output_text, token_ids=request.output_token_ids,
                   finish_reason=request.finish_reason, stop_reason=request.stop_reason,
                   token_times=request.token_times, logprobs=request.logprobs)

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's: the sum of the sampled tokens' log-probabilities (None when logprobs were not asked)."""
        if self.logprobs is None:
            return None
        return sum(step[t].logprob for step, t in zip(self.logprobs, self.token_ids))


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports about a request after a step (cumulative, not a delta), in vLLM's shape.

    `prompt` is the text prompt when the caller gave one (None for token prompts); the timing fields
    are sloserve's extras.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float
    first_scheduled_time: float | None
    finished_time: float | None
    num_preemptions: int
    prompt_logprobs: PromptLogprobs | None = None

    @classmethod
    def of(cls, request: Request) -> RequestOutput:
        return cls(
            request_id=request.request_id,
            prompt=None,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[CompletionOutput.of(request)],
            finished=request.finished,
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            finished_time=request.finished_time,
            num_preemptions=request.num_preemptions,
            prompt_logprobs=request.prompt_logprobs,
        )

    @property
    def ttft(self) -> float | None:
        times = self.outputs[0].token_times
        return times[0] - self.arrival_time if times else None
