"""Sampling: greedy, temperature, top-k, top-p, and per-request seeds.

A seeded request draws from its own generator, one row at a time, so its tokens do not depend on
what else shares the batch.

No parameter can make a row produce NaN or an empty candidate set: logits are shifted so their
maximum is 0 before dividing by the temperature (a tiny temperature sends the others to -inf,
never to +inf, and leaves the maximum at 0 on every device), and the most likely token always
survives the top-k/top-p cuts. A row whose logits
hold no finite value at all raises `SamplingError` naming its request, so the engine fails only it.
"""
from __future__ import annotations

import torch

from sloserve.model.logits_processors import TokenHistory, apply_logits_processors
from sloserve.request import SamplingParams


class SamplingError(ValueError):
    """One row could not be sampled (the model gave it no finite logit)."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"{request_id}: {message}")
        self.request_id = request_id


class Sampler:
    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        # Generators live where the logits are: sampling on a GPU never copies a vocabulary row back.
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)  # for unseeded requests
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
               histories: list[TokenHistory] | None = None) -> list[int]:
        """logits: [rows, vocab] float32, one row per request; histories: each row's tokens so far."""
        logits = apply_logits_processors(logits, params, histories)
        # max(dim).indices: the same first maximal index as argmax, at less than half its cost on CPU.
        best = logits.max(dim=-1)
        tokens = best.indices.tolist()
        # A NaN anywhere in a row makes max() return it: a cheap per-batch check finds such rows.
        suspect = (~torch.isfinite(best.values)).nonzero().flatten().tolist()
        for row in suspect:
            tokens[row] = _finite_argmax(logits[row], request_ids[row])
        for row, (request_id, p) in enumerate(zip(request_ids, params)):
            if not p.greedy:
                tokens[row] = self._sample_row(logits[row], p, self.generator_for(request_id, p), request_id)
        return tokens

    def generator_for(self, request_id: str, p: SamplingParams) -> torch.Generator:
        if p.seed is None:
            return self.generator
        generator = self._request_generators.get(request_id)
        if generator is None:
            generator = self._request_generators[request_id] = torch.Generator(self.device).manual_seed(p.seed)
        return generator

    @classmethod
    def _sample_row(cls, logits: torch.Tensor, p: SamplingParams, generator: torch.Generator, request_id: str) -> int:
        return int(torch.multinomial(cls.probabilities(logits, p, request_id), 1, generator=generator))

    @staticmethod
    def probabilities(logits: torch.Tensor, p: SamplingParams, request_id: str) -> torch.Tensor:
        """The distribution a non-greedy request samples from: temperature, top-k, top-p applied to one row."""
        logits = _sanitized(logits, request_id)
        # Max at 0, so dividing by any positive temperature yields values in [-inf, 0]: no overflow to +inf.
        # CUDA divides by a scalar as a multiply by its reciprocal, which is inf in float32 below ~2.9e-39:
        # the maximum's 0 * inf is NaN there, and 0 is what 0 / T means.
        logits = torch.nan_to_num((logits - logits.max()) / p.temperature, nan=0.0, neginf=float("-inf"))
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p; the first token always stays, even
            # when top_p rounds to 0 in float32.
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False
            logits = logits.scatter(0, order[drop], float("-inf"))
        return logits.softmax(-1)


def _sanitized(logits: torch.Tensor, request_id: str) -> torch.Tensor:
    """NaN -> -inf and +inf -> the largest float, so the row's maximum is finite; no finite value -> SamplingError."""
    finite_max = torch.finfo(logits.dtype).max
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=finite_max, neginf=float("-inf"))
    if not torch.isfinite(logits.max()):
        raise SamplingError(request_id, "the model produced no finite logit for this request")
    return logits


def _finite_argmax(logits: torch.Tensor, request_id: str) -> int:
    return int(_sanitized(logits, request_id).max(dim=-1).indices)
