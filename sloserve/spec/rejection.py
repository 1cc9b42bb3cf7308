"""Verification of drafts against the target's logits: exact argmax matching for greedy requests,
rejection sampling (Leviathan et al., 2023) for sampled ones, so the output follows the target's distribution."""
from __future__ import annotations

import torch

from sloserve.request import SamplingParams


def verify(
    logits: torch.Tensor,  # [k + 1, vocab]: the target's logits at the k draft positions and one past them
    drafts: list[int],
    params: SamplingParams,
    probs_of,  # logits row -> the target's sampling distribution (temperature, top-k, top-p applied)
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,  # [k, vocab] the draft's distributions; None: deterministic drafts
) -> list[int]:
    """The accepted drafts followed by one token from the target (the correction, or the bonus token)."""
    if params.greedy:
        # The same max(dim).indices as the sampler's greedy path, so speculation cannot change a token.
        target = logits.max(dim=-1).indices.tolist()
        out = []
        for i, d in enumerate(drafts):
            out.append(target[i])
            if target[i] != d:
                return out
        out.append(target[len(drafts)])
        return out
    out = []
    for i, d in enumerate(drafts):
        p = probs_of(logits[i])
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        u = float(torch.rand(1, generator=generator, device=logits.device))
        if u * q_d < float(p[d]):  # accept with probability min(1, p(d) / q(d))
            out.append(d)
            continue
        # Rejected: draw from the residual max(p - q, 0), normalised; with a one-hot q that is p without d.
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0
        else:
            residual = (p - draft_probs[i]).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q: the residual is empty and any draw from p is exact
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs_of(logits[len(drafts)]), 1, generator=generator)))
    return out
