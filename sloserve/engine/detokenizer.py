"""Incremental detokenization: turn a growing list of token ids into text deltas."""
from __future__ import annotations

# Tokens of prompt context decoded with the output so that a leading space or a multi-byte
# character split across the prompt/output boundary comes out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Emits text only once it is complete: a trailing U+FFFD means a UTF-8 sequence is still open."""

    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]
