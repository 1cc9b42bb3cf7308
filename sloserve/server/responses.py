"""Response bodies and stream chunks in OpenAI's shapes, for completions and chat completions."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True)
class Envelope:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str


class CompletionFormat:
    """`/v1/completions`: object `text_completion`, choices carry `text`."""

    object = "text_completion"

    def choice(self, index: int, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return choice

    def full(self, env: Envelope, choices: list[dict], usage: Usage, prompt_token_ids: list[int] | None) -> dict:
        return _full(env, self.object, choices, usage, prompt_token_ids)

    def first_chunk(self, env: Envelope, prompt_token_ids: list[int] | None, n: int = 1) -> dict | None:
        if prompt_token_ids is None:
            return None
        return _head(env, self.object) | {"choices": [], "prompt_token_ids": prompt_token_ids}

    def chunk(self, env: Envelope, index: int, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
        return _head(env, self.object) | {"choices": [self.choice(index, text, finish_reason, token_ids)]}

    def usage_chunk(self, env: Envelope, usage: Usage) -> dict:
        return _head(env, self.object) | {"choices": [], "usage": usage.as_dict()}


class ChatFormat:
    """`/v1/chat/completions`: `chat.completion` with a message, streamed as `chat.completion.chunk` deltas."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, index: int, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
        choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return choice

    def full(self, env: Envelope, choices: list[dict], usage: Usage, prompt_token_ids: list[int] | None) -> dict:
        return _full(env, self.object, choices, usage, prompt_token_ids)

    def first_chunk(self, env: Envelope, prompt_token_ids: list[int] | None, n: int = 1) -> dict | None:
        # OpenAI's stream opens with the role alone, for every choice; clients build each message from it.
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(n)]
        body = _head(env, self.chunk_object) | {"choices": choices}
        if prompt_token_ids is not None:
            body["prompt_token_ids"] = prompt_token_ids
        return body

    def chunk(self, env: Envelope, index: int, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
        delta = {"content": text} if text or finish_reason is None else {}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return _head(env, self.chunk_object) | {"choices": [choice]}

    def usage_chunk(self, env: Envelope, usage: Usage) -> dict:
        return _head(env, self.chunk_object) | {"choices": [], "usage": usage.as_dict()}


def _full(env: Envelope, obj: str, choices: list[dict], usage: Usage, prompt_token_ids: list[int] | None) -> dict:
    body = _head(env, obj) | {"choices": choices, "usage": usage.as_dict()}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def _head(env: Envelope, obj: str) -> dict:
    return {"id": env.id, "object": obj, "created": env.created, "model": env.model}
