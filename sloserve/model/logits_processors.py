"""vLLM's logits processors asked for by SamplingParams: min_tokens, the three penalties and min_p.

Each follows vLLM's definition (and, where transformers has one, equals its logits processor):
- min_tokens: EOS and stop_token_ids are impossible while fewer than min_tokens tokens were generated;
- repetition_penalty (CTRL, as transformers' RepetitionPenaltyLogitsProcessor): a token seen in the
  prompt or the output has its logit divided by the penalty when positive, multiplied when negative;
- presence/frequency penalty (OpenAI's): logit -= presence * [count > 0] + frequency * count, over
  the output tokens only;
- min_p: drop tokens whose probability after temperature is below min_p times the top one's.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from sloserve.request import SamplingParams


class TokenHistory(Protocol):
    """What a row's processors read about its request (a Request satisfies it)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


@dataclass(slots=True)
class _History:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


class TokenHistories:
    """Each request's tokens as the executor was given them, for the requests whose processors read them.

    A plan is plain data carrying only the slice of tokens computed this step, so the history is
    rebuilt from those slices (a slice at position p replaces everything from p on, which also
    covers recomputing after preemption). When a request samples, every token it has so far was
    fed; the prompt is what it held the first time it sampled.
    """

    def __init__(self, eos_token_ids: frozenset[int]) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self._tokens: dict[str, list[int]] = {}
        self._prompt_lens: dict[str, int] = {}

    def record(self, plan: SchedulerOutput) -> None:
        for request_id in plan.finished_request_ids:
            self._tokens.pop(request_id, None)
            self._prompt_lens.pop(request_id, None)
        for s in plan.scheduled:
            if is_active(s.sampling_params):
                tokens = self._tokens.setdefault(s.request_id, [])
                del tokens[s.num_computed_tokens:]
                tokens.extend(s.token_ids)
                if s.samples:
                    self._prompt_lens.setdefault(s.request_id, len(tokens))

    def of(self, scheduled: list[ScheduledRequest]) -> list[TokenHistory | None]:
        """The histories of the sampling rows (None for a row with no processor: never read)."""
        out: list[TokenHistory | None] = []
        for s in scheduled:
            tokens = self._tokens.get(s.request_id)
            if tokens is None:
                out.append(None)
                continue
            n = self._prompt_lens[s.request_id]
            out.append(_History(tokens[:n], tokens[n:], self.eos_token_ids))
        return out


def is_active(p: SamplingParams) -> bool:
    return bool(
        p.min_tokens or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.min_p
    )


def apply_logits_processors(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory | None] | None
) -> torch.Tensor:
    """logits: [rows, vocab]; returns them with each row's processors applied (rows without any untouched)."""
    rows = [row for row, p in enumerate(params) if is_active(p)]
    if not rows:
        return logits
    if histories is None or any(histories[row] is None for row in rows):
        raise ValueError("these sampling parameters need the requests' tokens, and the executor gave none")
    logits = logits.clone()
    for row in rows:
        logits[row] = _process_row(logits[row], params[row], histories[row])
    return logits


def _process_row(logits: torch.Tensor, p: SamplingParams, history: TokenHistory) -> torch.Tensor:
    output = history.output_token_ids
    if p.min_tokens and len(output) < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(history.eos_token_ids))
        banned_ids = [t for t in banned if 0 <= t < logits.shape[-1]]
        if banned_ids:
            logits[banned_ids] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(history.prompt_token_ids) | set(output)), dtype=torch.long, device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        ids = torch.tensor(output, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    if p.min_p and not p.greedy:
        # p_i >= min_p * p_max after temperature T  <=>  logit_i >= max_logit + T * ln(min_p): applied
        # before the sampler's own temperature, and argmax-invariant, so greedy rows skip it.
        threshold = logits.max() + p.temperature * math.log(p.min_p)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits
