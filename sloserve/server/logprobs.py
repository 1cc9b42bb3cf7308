"""OpenAI's logprobs objects (completions' and chat's) and completions' echo, built from the engine's Logprob dicts.

As vLLM's server writes them: a token's text is its `decoded_token` (the token decoded alone); a
log-probability of -inf is written as -9999.0 (JSON has no infinity); a completion's `top_logprobs`
holds the chosen token and the top-k (up to k + 1 entries, keyed by text), a chat's `top_logprobs`
the top-k in rank order. Without a tokenizer a token's text is `token_id:<id>` (vLLM's
`return_tokens_as_token_ids` spelling).
"""
from __future__ import annotations

from sloserve.engine.logprobs import MAX_LOGPROBS
from sloserve.request import Logprob, RequestOutput

_FLOOR = -9999.0


def completion_logprobs_error(logprobs: int | None, echo: bool, max_tokens: int | None) -> tuple[str, str] | None:
    """(param, message) when a completion's logprobs/echo/max_tokens cannot be served."""
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        return "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}] (the most this server allows), got {logprobs}"
    if max_tokens == 0 and not echo:
        return "max_tokens", "max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt)"
    return None


def prompt_logprobs_error(prompt_logprobs: int | None, stream: bool) -> tuple[str, str] | None:
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
        return "prompt_logprobs", (f"prompt_logprobs must be in [0, {MAX_LOGPROBS}] (the most this server allows), "
                                   f"got {prompt_logprobs}")
    if prompt_logprobs is not None and stream:
        return "prompt_logprobs", "prompt_logprobs are not available when stream is true (as in vLLM)"
    return None


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None]) -> list[dict | None]:
    """vLLM's `prompt_logprobs` field: per prompt token (None for the first) token id -> its Logprob's fields."""
    return [None if e is None else {str(token): {"logprob": max(lp.logprob, _FLOOR), "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for token, lp in e.items()}
            for e in entries]


def chat_logprobs_error(logprobs: bool, top_logprobs: int | None) -> tuple[str, str] | None:
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_LOGPROBS:
        return "top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}] (the most this server allows), got {top_logprobs}"
    if top_logprobs and not logprobs:
        return "top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true"
    return None


class ChoiceLogprobs:
    """One choice's logprobs (and, for completions, the echoed prompt), whole or a stream's chunk at a time.

    `num_top`: the k asked (None: no logprobs); `chat`: chat's shape, else completions'; `echo`: the
    prompt text (and with logprobs its logprobs) goes before the output; `echo_only`: max_tokens 0 with
    echo, so the one token generated to finish the request is not shown (vLLM's way too).
    """

    def __init__(self, num_top: int | None, *, chat: bool, echo: bool = False, echo_only: bool = False,
                 prompt_text: str = "", tokenizer=None) -> None:
        self.num_top = num_top
        self.chat = chat
        self.echo = echo
        self.echo_only = echo_only
        self.prompt_text = prompt_text
        self.tokenizer = tokenizer
        self._offset = 0  # completions' text_offset runs on across a stream's chunks
        self._echoed = False

    @property
    def wanted(self) -> bool:
        return self.num_top is not None

    def fill(self, choice: dict, out: RequestOutput, start: int, end: int) -> None:
        """Put the output tokens [start, end) into `choice` (and the prompt first, once, when echoing)."""
        echo_now = self.echo and not self._echoed
        self._echoed = True
        if echo_now:
            choice["text"] = self.prompt_text + choice.get("text", "")
        if not self.wanted:
            return
        completion = out.outputs[0]
        token_ids = completion.token_ids[start:end]
        entries = completion.logprobs[start:end]
        if echo_now:
            token_ids = out.prompt_token_ids + token_ids
            entries = out.prompt_logprobs + entries
        choice["logprobs"] = self._chat(token_ids, entries) if self.chat else self._completion(token_ids, entries)

    def _completion(self, token_ids: list[int], entries: list[dict[int, Logprob] | None]) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token, entry in zip(token_ids, entries):
            text = self._text(token, entry)
            tokens.append(text)
            text_offset.append(self._offset)
            self._offset += len(text)
            if entry is None:  # the prompt's first token: nothing came before it
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(max(entry[token].logprob, _FLOOR))
            top_logprobs.append({self._text(t, {t: lp}): max(lp.logprob, _FLOOR) for t, lp in entry.items()})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    def _chat(self, token_ids: list[int], entries: list[dict[int, Logprob]]) -> dict:
        content = []
        for token, entry in zip(token_ids, entries):
            top = sorted((item for item in entry.items() if item[1].rank is not None and item[1].rank <= self.num_top),
                         key=lambda item: item[1].rank)[: self.num_top]
            content.append(self._chat_entry(token, entry[token]) | {
                "top_logprobs": [self._chat_entry(t, lp) for t, lp in top]})
        return {"content": content}

    def _chat_entry(self, token: int, lp: Logprob) -> dict:
        text = self._text(token, {token: lp})
        return {"token": text, "logprob": max(lp.logprob, _FLOOR), "bytes": list(text.encode("utf-8", errors="replace"))}

    def _text(self, token: int, entry: dict[int, Logprob] | None) -> str:
        decoded = None if entry is None else entry[token].decoded_token
        if decoded is not None:
            return decoded
        if self.tokenizer is not None:
            return self.tokenizer.decode([token])
        return f"token_id:{token}"


def choice_logprobs(body, prompt_token_ids: list[int], tokenizer) -> ChoiceLogprobs:
    """What a completions or chat request body asks of its choice's logprobs and echo."""
    if not hasattr(body, "echo"):  # chat
        return ChoiceLogprobs((body.top_logprobs or 0) if body.logprobs else None, chat=True, tokenizer=tokenizer)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one (larger batches are refused)
    if isinstance(prompt, str):
        text = prompt
    else:
        text = "" if tokenizer is None else tokenizer.decode(prompt_token_ids)
    return ChoiceLogprobs(body.logprobs, chat=False, echo=body.echo, echo_only=body.echo_only, prompt_text=text,
                          tokenizer=tokenizer)
