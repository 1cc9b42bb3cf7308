"""The profiler's grid of step shapes, and real SchedulerOutput plans built for them from real Requests."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from sloserve.request import Request, SamplingParams
from sloserve.sim.features import StepShape


@dataclass(slots=True)
class Chunk:
    """One scheduled request: `new_tokens` computed on top of `context` cached ones."""

    new_tokens: int
    context: int
    samples: bool = True  # False: a prefill chunk that stops short of the prompt's end


@dataclass(slots=True)
class GridLimits:
    """What the engine could ever schedule: shapes outside these never occur, so they are not measured."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int

    def allows(self, step: list[Chunk]) -> bool:
        blocks = sum(-(-(c.context + c.new_tokens) // self.block_size) for c in step)
        return (
            0 < len(step) <= self.max_num_seqs
            and sum(c.new_tokens for c in step) <= self.max_num_batched_tokens
            and all(c.context + c.new_tokens + (not c.samples) <= self.max_model_len for c in step)
            and blocks <= self.num_kv_blocks
        )


def step_grid(limits: GridLimits, quick: bool = False) -> list[list[Chunk]]:
    """Prefill chunks with and without cached context, decode batches over sizes and contexts, mixes."""
    budget = limits.max_num_batched_tokens
    if quick:
        chunks, contexts, batches, decode_contexts, mixed_decodes = (8, 32, 64), (32,), (1, 4, 8), (8, 64), (2, 8)
    else:
        chunks = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 2048)
        contexts = (128, 512, 1024, 2048)
        batches = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)
        decode_contexts = (16, 64, 256, 512, 1024, 2048)
        mixed_decodes = (2, 8, 32)
    chunks = sorted({min(n, budget) for n in chunks} | {budget}) if budget > 1 else [budget]
    grid: list[list[Chunk]] = [[Chunk(n, 0)] for n in chunks]
    grid += [[Chunk(n, c)] for c in contexts for n in chunks[::2]]
    grid += [[Chunk(budget, 0, samples=False)], [Chunk(budget, budget, samples=False)]]
    grid += [[Chunk(budget // k, 0)] * k for k in (2, 4) if budget // k > 1]
    grid += [[Chunk(1, c)] * b for b in batches for c in decode_contexts]
    for b in batches[1::2]:  # uneven contexts: the runner pads decodes to the longest one
        top = decode_contexts[-1]
        grid.append([Chunk(1, 8 + (top - 8) * i // max(1, b - 1)) for i in range(b)])
    middle = decode_contexts[len(decode_contexts) // 2]
    for b in mixed_decodes:
        for n, c in itertools.product((chunks[0], chunks[len(chunks) // 2], budget - b), (0, contexts[-1])):
            if n > 1:
                grid.append([Chunk(1, middle)] * b + [Chunk(n, c)])
    seen, out = set(), []
    for step in grid:
        step = _shrink(step, limits)
        key = tuple((c.new_tokens, c.context, c.samples) for c in step)
        if key not in seen and limits.allows(step):
            seen.add(key)
            out.append(step)
    return out


def _shrink(step: list[Chunk], limits: GridLimits) -> list[Chunk]:
    """Cut contexts down to what max_model_len and the KV cache allow, keeping the shape's proportions."""
    step = [Chunk(c.new_tokens, max(0, min(c.context, limits.max_model_len - c.new_tokens - (not c.samples))), c.samples)
            for c in step]
    capacity = (limits.num_kv_blocks - len(step)) * limits.block_size  # a partial block per request
    total = sum(c.context + c.new_tokens for c in step)
    if total > capacity:
        room = capacity - sum(c.new_tokens for c in step)
        context = sum(c.context for c in step)
        scale = max(0.0, room / context) if context else 0.0
        step = [Chunk(c.new_tokens, int(c.context * scale), c.samples) for c in step]
    return step


class PlanBuilder:
    """Builds a plan the way the Scheduler would: real Requests with blocks from a real BlockManager."""

    def __init__(self, block_manager: BlockManager, vocab_size: int) -> None:
        self.block_manager = block_manager
        self.vocab_size = vocab_size
        self._ids = itertools.count()

    def build(self, step: list[Chunk]) -> SchedulerOutput:
        plan = SchedulerOutput()
        for chunk in step:
            length = chunk.context + chunk.new_tokens + (0 if chunk.samples else 1)
            request = Request(
                request_id=f"profile-{next(self._ids)}",
                prompt_token_ids=[(7 * i + 3) % self.vocab_size for i in range(length)],
                sampling_params=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                arrival_time=0.0,
            )
            request.num_computed_tokens = chunk.context
            if not self.block_manager.allocate_slots(request.request_id, chunk.context + chunk.new_tokens):
                self.release(plan)
                raise ValueError(f"the KV cache cannot hold step {step}")
            plan.scheduled.append(
                ScheduledRequest(request, chunk.new_tokens, self.block_manager.block_tables[request.request_id])
            )
        return plan

    def release(self, plan: SchedulerOutput) -> None:
        for s in plan.scheduled:
            self.block_manager.free(s.request.request_id)


def shape_of(step: list[Chunk]) -> StepShape:
    return StepShape([c.new_tokens for c in step], [c.context for c in step], [c.samples for c in step])
