"""Token counting on the client: an optional local tokenizer, else a documented estimate."""
from __future__ import annotations

import math
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from a hub)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer  # lazy: importing transformers costs seconds

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = int(self._tok.vocab_size)
        self.path = path

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS: we count what the text costs, the server adds its own specials.
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def estimate_tokens(text: str) -> int:
    """Tokens in `text` without a tokenizer: ceil(chars / 4), OpenAI's rule of thumb for English."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def count_tokens(text: str, tokenizer: Tokenizer | None) -> int:
    return len(tokenizer.encode(text)) if tokenizer is not None else estimate_tokens(text)
