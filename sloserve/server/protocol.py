"""Request bodies of the OpenAI API (completions, chat completions) with vLLM's extensions."""
from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sloserve.server.errors import APIError, validation_message
from sloserve.server.logprobs import chat_logprobs_error, completion_logprobs_error, prompt_logprobs_error
from sloserve.server.vllm_fields import refuse_unsupported_vllm_fields

# No coercion ("4" is not 4, 0 is not false, [true] is not a token list) and no NaN or infinity:
# a loose reading would run something the client did not ask for.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


class SLOParams(BaseModel):
    """Latency objectives in milliseconds, as clients think of them (the engine stores seconds)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2e_ms: float | None = Field(None, gt=0)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk, so clients count tokens per chunk


class SamplingFields(BaseModel):
    """What completions and chat completions share: the model, sampling and the extensions."""

    # Unknown fields are ignored, as OpenAI's SDKs add new ones faster than servers follow.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=_INT64_MAX)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=_INT64_MIN, le=_INT64_MAX)
    best_of: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)  # OpenAI's on completions; vLLM's on chat too
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names where vLLM has one).
    top_k: int = Field(0, ge=-1, le=_INT64_MAX)
    ignore_eos: bool = False
    priority: int = Field(0, ge=_INT64_MIN, le=_INT64_MAX)
    slo: SLOParams | None = None
    slo_class: str | None = None  # a class the server defines (--slo-class); also the X-SLO-Class header
    return_token_ids: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    min_p: float = Field(0.0, ge=0, le=1)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)  # vLLM's: the prompt's, whole replies only

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # Many clients send null for what they leave unset; OpenAI reads that as the default.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first parameter this server cannot honour, if any."""
        refused = prompt_logprobs_error(self.prompt_logprobs, self.stream)
        if refused is not None:
            return refused
        if self.best_of is not None and self.best_of != self.n:
            # best_of = n returns every sequence: that is n. More would need ranking by cumulative log-probability.
            return "best_of", (f"best_of={self.best_of} is not supported: only best_of equal to n ({self.n}); "
                               "use n to get several completions")
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    # Text, token ids, or a batch of exactly one of those.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=_INT64_MAX)  # 0 only with echo: the prompt scored, nothing generated
    echo: bool = False
    logprobs: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    suffix: str | None = None

    @property
    def echo_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        # vLLM's way with max_tokens 0 and echo: generate one token, show none.
        return 1 if self.echo_only else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        refused = completion_logprobs_error(self.logprobs, self.echo, self.max_tokens)
        if refused is not None:
            return refused
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    # Parts other than text (images, audio) fail validation: this server has no such models.
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=_INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        refused = chat_logprobs_error(self.logprobs, self.top_logprobs)
        if refused is not None:
            return refused
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported"
        return super().unsupported()


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, cls: type[Body]) -> Body:
    """Parse a JSON body; every failure is a 400 naming what is wrong, never an exception's text."""
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_json_number)
    except json.JSONDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    except ValueError as error:  # an integer past Python's digit limit, or NaN/Infinity
        raise APIError(400, f"the request body is not valid JSON: {_first_line(error)}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    refuse_unsupported_vllm_fields(data)
    try:
        where = _lone_surrogate(data, "")
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    if where is not None:
        raise APIError(400, f"{where or 'the body'}: a string holds a lone UTF-16 surrogate, which is not text",
                       param=where or None)
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        message, param = validation_message(error.errors())
        raise APIError(400, message, param=param) from None


def _json_number(text: str) -> int | float:
    """JSON has one number type: 4.0 is the integer 4 (JSON Schema agrees), 4.5 stays a float.

    Strict parsing then refuses only what is not a number ("4", true), not a spelling of one.
    """
    value = float(text)
    return int(value) if value.is_integer() else value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _first_line(error: Exception) -> str:
    # Python's int-limit message suggests sys.set_int_max_str_digits(): advice for the server, not the client.
    return str(error).split(";")[0].split("\n")[0][:200]


def _lone_surrogate(value, path: str) -> str | None:
    """The dotted path of the first string (or key) that cannot be UTF-8 encoded, if any."""
    if isinstance(value, str):
        return None if value.isascii() or not _has_surrogate(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if _has_surrogate(key):
                return path or "the body"
            found = _lone_surrogate(item, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}.{i}")
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
