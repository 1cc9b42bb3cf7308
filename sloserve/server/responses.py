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

    def full(self, env: Envelope, text: str, finish_reason: str | None, usage: Usage, token_ids: list[int] | None,
             prompt_token_ids: list[int] | None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = _head(env, self.object) | {"choices": [choice], "usage": usage.as_dict()}
        if prompt_token_ids is not None:
            body["prompt_token_ids"] = prompt_token_ids
        return body

    def first_chunk(self, env: Envelope, prompt_token_ids: list[int] | None) -> dict | None:
        if prompt_token_ids is None:
            return None
        return _head(env, self.object) | {"choices": [], "prompt_token_ids": prompt_token_ids}

    def chunk(self, env: Envelope, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return _head(env, self.object) | {"choices": [choice]}

    def usage_chunk(self, env: Envelope, usage: Usage) -> dict:
        return _head(env, self.object) | {"choices": [], "usage": usage.as_dict()}


class ChatFormat:
    """`/v1/chat/completions`: `chat.completion` with a message, streamed as `chat.completion.chunk` deltas."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def full(self, env: Envelope, text: str, finish_reason: str | None, usage: Usage, token_ids: list[int] | None,
             prompt_token_ids: list[int] | None) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = _head(env, self.object) | {"choices": [choice], "usage": usage.as_dict()}
        if prompt_token_ids is not None:
            body["prompt_token_ids"] = prompt_token_ids
        return body

    def first_chunk(self, env: Envelope, prompt_token_ids: list[int] | None) -> dict | None:
        # OpenAI's stream opens with the role alone; clients build the message from it.
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        body = _head(env, self.chunk_object) | {"choices": [choice]}
        if prompt_token_ids is not None:
            body["prompt_token_ids"] = prompt_token_ids
        return body

    def chunk(self, env: Envelope, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
        delta = {"content": text} if text or finish_reason is None else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return _head(env, self.chunk_object) | {"choices": [choice]}

    def usage_chunk(self, env: Envelope, usage: Usage) -> dict:
        return _head(env, self.chunk_object) | {"choices": [], "usage": usage.as_dict()}


def _head(env: Envelope, obj: str) -> dict:
    return {"id": env.id, "object": obj, "created": env.created, "model": env.model}
