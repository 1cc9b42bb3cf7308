"""The Executor seam: whatever runs a step's plan (a real model, or a cost model on a virtual clock)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sloserve.engine.scheduler import SchedulerOutput


class Executor(Protocol):
    num_kv_blocks: int  # KV capacity this executor holds, in blocks of the engine's block size

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        """Run one step; return, per scheduled request, its sampled tokens (empty: mid-prefill)."""
        ...


@dataclass(slots=True)
class PositionLogprobs:
    """One position's log-probabilities as plain numbers (vLLM's LogprobsLists row)."""

    token_ids: list[int]  # the token at this position (sampled, or the prompt's) first, then the top-k in rank order
    logprobs: list[float]  # of each of token_ids
    rank: int  # the first token's rank in the vocabulary (1 = most likely); the top-k's are 1..k


@dataclass(slots=True)
class StepLogprobs:
    """What one step computed for one request that asked for logprobs."""

    sampled: list[PositionLogprobs] = field(default_factory=list)  # one per token sampled this step
    prompt_start: int = 0  # the index of the token that prompt[0] scores (prompt token 0 has none)
    prompt: list[PositionLogprobs] = field(default_factory=list)  # consecutive tokens from prompt_start on


class LogprobsExecutor(Executor, Protocol):
    """An executor that computes log-probabilities; an engine refuses logprobs requests without one."""

    def take_logprobs(self) -> dict[str, StepLogprobs]:
        """The logprobs of every request that asked, computed since the last call (then forgotten)."""
        ...
