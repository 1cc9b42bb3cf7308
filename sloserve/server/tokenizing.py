"""Prompt tokenization for the server: off the event loop, after a size check, with user text kept as text."""
from __future__ import annotations

import asyncio
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from sloserve.server.errors import APIError

# Roles every chat template understands; a template may know more, and says so by naming them.
_BASE_ROLES = ("system", "user", "assistant")
_OPTIONAL_ROLES = ("tool", "developer", "function", "ipython")


class PromptTokenizer:
    """Turns prompt text and chat messages into token ids on a worker thread, never on the event loop.

    A prompt longer than `max_model_len * longest token` characters cannot fit the model whatever
    it tokenizes to, so it is refused before any work (a 4 MiB prompt used to freeze every stream
    for seconds and grow memory by ~0.6 GB on its way to a 400).
    """

    def __init__(self, tokenizer, max_model_len: int, workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.max_chars = max_model_len * _longest_token_chars(tokenizer)
        self.roles = _template_roles(getattr(tokenizer, "chat_template", None))
        specials = sorted(_added_token_strings(tokenizer), key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._encode_as_text = _text_only_encoder(tokenizer) if specials else None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sloserve-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def prompt(self, text: str) -> list[int]:
        self._check_chars(len(text), "prompt")
        return await self._run(self.tokenizer.encode, text)

    async def chat(self, messages: list[dict]) -> list[int]:
        for i, m in enumerate(messages):
            if m["role"] not in self.roles:
                raise APIError(400, f"messages[{i}].role must be one of {', '.join(sorted(self.roles))} for this "
                               f"model's chat template", param=f"messages.{i}.role")
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        return await self._run(self._chat_ids, messages)

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_chars:
            raise APIError(400, f"the {param} has {num_chars} characters, more than could fit this model's context "
                           f"(at most {self.max_chars})", param=param, code="context_length_exceeded")

    async def _run(self, fn, arg):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, arg)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if self._special is None or not any(self._special.search(m["content"]) for m in messages):
            # The template writes any special tokens (BOS, role markers) itself.
            return self.tokenizer.encode(self._render(messages), add_special_tokens=False)
        return self._chat_ids_with_literal_specials(messages)

    def _chat_ids_with_literal_specials(self, messages: list[dict]) -> list[int]:
        """Render with a placeholder per message, then encode the template's text with its special
        tokens and each message's text with special-token strings split as plain text."""
        tag = secrets.token_hex(8)
        holders = [f"@@{tag}:{i}@@" for i in range(len(messages))]
        text = self._render([m | {"content": h} for m, h in zip(messages, holders)])
        parts = re.split(f"@@{tag}:([0-9]+)@@", text)
        order = [int(p) for p in parts[1::2]]
        if order != list(range(len(messages))):
            raise APIError(400, "message content holds special-token text, and this model's chat template "
                           "transforms content, so it cannot be kept as plain text", param="messages")
        ids: list[int] = []
        for i, piece in enumerate(parts):
            if i % 2 == 0:
                ids += self.tokenizer.encode(piece, add_special_tokens=False) if piece else []
            else:
                ids += self._encode_as_text(messages[int(piece)]["content"])
        return ids

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # noqa: BLE001 - a template's own raise_exception() explains itself
            from jinja2 import TemplateError

            if isinstance(error, TemplateError):
                raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from None
            raise APIError(400, "the chat template could not render these messages", param="messages") from None


def _longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers (vocab strings are at least as long as their text)."""
    vocab = tokenizer.get_vocab()
    return max((len(piece) for piece in vocab), default=1) or 1


def _added_token_strings(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [token.content for token in decoder.values() if token.content]


def _template_roles(template) -> frozenset[str]:
    source = " ".join(map(str, template.values())) if isinstance(template, dict) else str(template or "")
    named = {r for r in _OPTIONAL_ROLES if f"'{r}'" in source or f'"{r}"' in source}
    return frozenset(_BASE_ROLES) | named


def _text_only_encoder(tokenizer):
    """text -> ids, reading special-token strings as ordinary text.

    A fast tokenizer gets a copy of its backend for this, not the shared one's `split_special_tokens`
    switch: flipping that flag is not safe while another thread encodes with the same tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    return lambda text: copy.encode(text, add_special_tokens=False).ids
