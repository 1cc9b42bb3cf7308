"""Log-probabilities of chosen tokens and their top-k alternatives, from logits rows (vLLM's raw_logprobs).

They are the model's own distribution: log_softmax of the float32 logits that the sampler is handed,
before any penalty, temperature, top-k/top-p or min_p (vLLM's default `--logprobs-mode raw_logprobs`).
A token's rank counts the tokens at least as likely as it (vLLM's rule), so the most likely has rank 1.
"""
from __future__ import annotations

import torch

from sloserve.engine.executor import PositionLogprobs
from sloserve.engine.scheduler import ScheduledRequest


ROWS_AT_ONCE = 512  # a long prompt's rows are scored in slices: its log-softmax copy stays small


def position_logprobs(logits: torch.Tensor, chosen: list[int], num_top: list[int]) -> list[PositionLogprobs]:
    """logits: [rows, vocab]; chosen: each row's token; num_top: how many alternatives each row lists."""
    out: list[PositionLogprobs] = []
    for i in range(0, len(chosen), ROWS_AT_ONCE):
        j = i + ROWS_AT_ONCE
        out += _score(logits[i:j], chosen[i:j], num_top[i:j])
    return out


def _score(logits: torch.Tensor, chosen: list[int], num_top: list[int]) -> list[PositionLogprobs]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(chosen, dtype=torch.long, device=logprobs.device)[:, None]
    chosen_logprobs = logprobs.gather(1, index)
    ranks = (logprobs >= chosen_logprobs).sum(-1).tolist()
    chosen_values = chosen_logprobs[:, 0].tolist()
    k = min(max(num_top), logprobs.shape[-1])
    top_values, top_ids = ([[]] * len(chosen), [[]] * len(chosen))
    if k:
        top = logprobs.topk(k, dim=-1)  # sorted, most likely first
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        PositionLogprobs([token] + ids[:n], [value] + values[:n], rank)
        for token, value, rank, ids, values, n in zip(chosen, chosen_values, ranks, top_ids, top_values, num_top)
    ]


class PromptScorer:
    """Prompt logprobs across prefill chunks, for the requests that ask.

    The row at a prompt position scores the token after it; the last row of a chunk that does not
    reach the end of the prompt scores the first token of the next chunk, which this step's plan does
    not carry, so that row waits here (its raw logits) until the next chunk arrives.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[int, torch.Tensor]] = {}  # request id -> (position, its logits row)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._pending.pop(request_id, None)

    def score(self, parts: list[tuple[ScheduledRequest, int]], logits: torch.Tensor) -> tuple[dict, dict]:
        """parts: (request, its number of prompt rows), in the order of `logits`' rows.

        Returns {request id: (index of the first token scored, [PositionLogprobs])} and the waiting rows
        to keep (None: drop); `keep` applies the latter once the whole step has succeeded.
        """
        scored, waiting, offset = {}, {}, 0
        for s, count in parts:
            rows, offset = logits[offset : offset + count], offset + count
            start = s.num_computed_tokens
            known = count if s.samples else count - 1  # rows whose next token is in this chunk
            targets = s.token_ids[1 : known + 1]
            first = start + 1
            pending = self._pending.get(s.request_id)
            if pending is not None and pending[0] == start - 1:  # not a stale row from before a preemption
                rows, targets, first = torch.cat([pending[1][None], rows]), [s.token_ids[0]] + targets, start
                known += 1
            k = s.sampling_params.prompt_logprobs
            scored[s.request_id] = (first, position_logprobs(rows[:known], targets, [k] * len(targets)))
            waiting[s.request_id] = None if s.samples else (start + count - 1, rows[known].clone())
        return scored, waiting

    def keep(self, waiting: dict) -> None:
        for request_id, row in waiting.items():
            if row is None:
                self._pending.pop(request_id, None)
            else:
                self._pending[request_id] = row
