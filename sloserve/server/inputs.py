"""From an API request to the engine's inputs: prompt token ids, SamplingParams and SLO, checked against the model."""
from __future__ import annotations

from dataclasses import dataclass

from sloserve.request import SLO, SamplingParams
from sloserve.slo_classes import SLOClasses
from sloserve.server.errors import APIError
from sloserve.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from sloserve.server.tokenizing import PromptTokenizer

OPENAI_DEFAULT_MAX_TOKENS = 16  # completions' default when max_tokens is absent


@dataclass(slots=True)
class ModelLimits:
    max_model_len: int
    max_tokens_cap: int  # no request may ask for more output than this (latency-attack guard)
    max_n: int = 1  # most completions per request: the engine's seats (max_num_seqs), so siblings never queue behind each other


@dataclass(slots=True)
class EngineInputs:
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    slo: SLO | None


async def completion_prompt(req: CompletionRequest, tokens: PromptTokenizer | None) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"a batch of {len(prompt)} prompts is not supported; send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return list(prompt)
    if tokens is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
    return await tokens.prompt(prompt)


async def chat_prompt(req: ChatCompletionRequest, tokens: PromptTokenizer | None) -> list[int]:
    if tokens is None:
        raise APIError(400, "chat completions need a tokenizer, and this model has none; use /v1/completions with token ids")
    if not getattr(tokens.tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    return await tokens.chat([{"role": m.role, "content": m.text()} for m in req.messages])


def sampling_extensions(req: SamplingFields) -> dict:
    """The vLLM sampling fields beyond OpenAI's core, passed to SamplingParams under the same names."""
    return dict(
        stop_token_ids=list(req.stop_token_ids or ()), min_tokens=req.min_tokens,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, min_p=req.min_p,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
        **logprobs_params(req),
    )


def logprobs_params(req: SamplingFields) -> dict:
    """Completions' `logprobs` (and with echo, the prompt's too) or chat's `logprobs` + `top_logprobs`, as vLLM maps them."""
    prompt = req.prompt_logprobs  # vLLM's extension; else echo scores the prompt with `logprobs`, as vLLM does
    if isinstance(req, CompletionRequest):
        return dict(logprobs=req.logprobs, prompt_logprobs=req.logprobs if prompt is None and req.echo else prompt)
    if isinstance(req, ChatCompletionRequest):
        return dict(logprobs=(req.top_logprobs or 0) if req.logprobs else None, prompt_logprobs=prompt)
    return {}


def engine_inputs(
    req: SamplingFields, prompt_token_ids: list[int], limits: ModelLimits, *, requested_max_tokens: int | None,
    default_max_tokens: int | None, slo_classes: SLOClasses | None = None, slo_class_header: str | None = None,
) -> EngineInputs:
    """`default_max_tokens` None means: the rest of the context, up to the cap (chat's default)."""
    unsupported = req.unsupported()
    if unsupported is not None:
        param, message = unsupported
        raise APIError(400, message, param=param)
    if req.n > limits.max_n:
        raise APIError(400, f"n is {req.n}, but this server allows at most {limits.max_n} (its --max-num-seqs)", param="n")
    if req.n > 1 and (any(v is not None for v in logprobs_params(req).values()) or getattr(req, "echo", False)):
        raise APIError(400, "n > 1 together with logprobs or echo is not supported yet; ask n = 1", param="n")
    num_prompt = len(prompt_token_ids)
    room = limits.max_model_len - num_prompt
    if room < 1:
        raise APIError(
            400, f"This model's maximum context length is {limits.max_model_len} tokens, but the prompt has "
            f"{num_prompt} tokens, leaving no room for output.", param="messages" if default_max_tokens is None else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = requested_max_tokens
    if max_tokens is None:
        # Absent a request, fit the default into the context instead of refusing the prompt.
        max_tokens = min(room, limits.max_tokens_cap if default_max_tokens is None else default_max_tokens)
    elif max_tokens > limits.max_tokens_cap:
        raise APIError(400, f"max_tokens is {max_tokens}, but this server allows at most {limits.max_tokens_cap}", param="max_tokens")
    elif num_prompt + max_tokens > limits.max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded",
        )
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed, stop=req.stop_list, ignore_eos=req.ignore_eos, n=req.n,
            **sampling_extensions(req),
        )
    except ValueError as error:
        # SamplingParams' messages open with the parameter's name.
        message = str(error)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from None
    return EngineInputs(prompt_token_ids, params, req.priority, request_slo(req, slo_classes or SLOClasses(), slo_class_header))


def request_slo(req: SamplingFields, classes: SLOClasses, header: str | None) -> SLO | None:
    """The request's own `slo`, else its class (the `slo_class` field, else the X-SLO-Class header), else the default class."""
    name = req.slo_class if req.slo_class is not None else header
    if req.slo is not None:
        if name is not None:
            raise APIError(400, "give either an slo or an slo_class (or X-SLO-Class header), not both", param="slo_class")
        ms = req.slo
        return SLO(
            ttft=None if ms.ttft_ms is None else ms.ttft_ms / 1e3,
            tpot=None if ms.tpot_ms is None else ms.tpot_ms / 1e3,
            e2e=None if ms.e2e_ms is None else ms.e2e_ms / 1e3,
        )
    try:
        return classes.resolve(name)
    except ValueError as error:
        raise APIError(400, str(error), param="slo_class") from None
