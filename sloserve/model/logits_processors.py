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
from typing import Protocol

import torch

from sloserve.request import SamplingParams


class TokenHistory(Protocol):
    """What a row's processors read about its request (a Request satisfies it)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


def is_active(p: SamplingParams) -> bool:
    return bool(
        p.min_tokens or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.min_p
    )


def apply_logits_processors(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory] | None
) -> torch.Tensor:
    """logits: [rows, vocab]; returns them with each row's processors applied (rows without any untouched)."""
    rows = [row for row, p in enumerate(params) if is_active(p)]
    if not rows:
        return logits
    if histories is None:
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
