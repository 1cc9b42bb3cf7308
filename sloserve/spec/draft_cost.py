"""What drafting costs, predicted from a step-time model: shared by the real proposers and the simulated one."""
from __future__ import annotations

from sloserve.engine.cost import StepTimeModel
from sloserve.engine.features import StepShape


def draft_model_seconds(step: StepTimeModel, ks: list[int], contexts: list[int]) -> float:
    """k autoregressive draft steps, batched over the requests still drafting at each step."""
    seconds = 0.0
    for i in range(max(ks, default=0)):
        rows = [c for k, c in zip(ks, contexts) if k > i]
        # The first step feeds what the target accepted since the last proposal (typically two tokens).
        new = 2 if i == 0 else 1
        seconds += step.step_seconds(StepShape([new] * len(rows), [c + i for c in rows], [True] * len(rows)))
    return seconds


def ngram_seconds(seconds_per_token: float, ks: list[int], contexts: list[int]) -> float:
    """A prompt lookup scans the request's context once."""
    return seconds_per_token * sum(c for k, c in zip(ks, contexts) if k)
