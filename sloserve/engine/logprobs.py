"""Carrying an executor's log-probabilities into requests, in vLLM's shape (token id -> Logprob, with text)."""
from __future__ import annotations

from sloserve.engine.executor import PositionLogprobs, StepLogprobs
from sloserve.request import Logprob, Request

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs: the most alternatives a request may ask for


class LogprobsRecorder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def start(self, request: Request) -> None:
        """Give a request that asks for them its (empty) logprobs lists; the first prompt token has none."""
        params = request.sampling_params
        if params.logprobs is not None:
            request.logprobs = []
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]

    def record_prompt(self, request: Request, step: StepLogprobs) -> None:
        """Append the prompt positions not seen yet (a recompute after preemption scores them again, and
        scores output tokens as if they were prompt: both are dropped)."""
        have = request.prompt_logprobs
        if have is None:
            return
        skip = len(have) - step.prompt_start
        if skip < 0:
            raise RuntimeError(f"{request.request_id}: prompt logprobs skipped tokens {len(have)}..{step.prompt_start - 1}")
        room = request.num_prompt_tokens - len(have)
        have.extend(self._dict(p) for p in step.prompt[skip : skip + room])

    def record_sampled(self, request: Request, step: StepLogprobs | None, num_tokens: int) -> None:
        if request.logprobs is None:
            return
        if step is None or len(step.sampled) != num_tokens:
            raise RuntimeError(f"{request.request_id}: the executor returned no logprobs for its {num_tokens} tokens")
        request.logprobs.extend(self._dict(p) for p in step.sampled)

    def _dict(self, p: PositionLogprobs) -> dict[int, Logprob]:
        # vLLM's order: the chosen token first, then the top-k (a chosen token among them keeps one entry).
        ranks = [p.rank, *range(1, len(p.token_ids))]
        texts = [self._text(t) for t in p.token_ids]
        return {t: Logprob(lp, rank, text) for t, lp, rank, text in zip(p.token_ids, p.logprobs, ranks, texts)}

    def _text(self, token_id: int) -> str | None:
        # As vLLM decodes each logprob token: alone, special tokens kept.
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])
