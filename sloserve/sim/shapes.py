"""The profiler's grid of step shapes, and SchedulerOutput plans built for them with blocks from a real BlockManager."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from sloserve.request import SamplingParams
from sloserve.engine.features import StepShape, token_knots


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
    """Prefill chunks with and without cached context, decode batches over sizes and contexts, mixes.

    Every token-count knot of the step-time model gets its own decode batch or prefill chunk, so
    each value of the model's token table is measured, not inferred.
    """
    budget = limits.max_num_batched_tokens
    knots = token_knots(budget)
    if quick:
        chunk_extra, contexts, decode_contexts, mixed_decodes, most_decodes = (), (32,), (8, 64), (2, 8), 8
    else:
        chunk_extra, contexts = (384, 768, 1536), (128, 512, 1024, 2048)
        decode_contexts, mixed_decodes, most_decodes = (16, 64, 256, 512, 1024, 2048), (2, 8, 32), 256
    chunks = sorted({k for k in knots if k >= 8} | {n for n in chunk_extra if n < budget}) or [budget]
    batches = sorted({k for k in knots if k <= min(limits.max_num_seqs, most_decodes)}
                     | ({48, 96} if not quick else set()))
    middle = decode_contexts[len(decode_contexts) // 2]
    grid: list[list[Chunk]] = [[Chunk(n, 0)] for n in chunks]
    grid += [[Chunk(n, c)] for c in contexts for n in chunks[::2]]
    grid += [[Chunk(budget, 0, samples=False)], [Chunk(budget, budget, samples=False)]]
    grid += [[Chunk(budget // k, 0)] * k for k in (2, 4) if budget // k > 1]
    # Decode contexts in a batch differ in real serving (the runner then masks the padding); a few
    # batches of equal contexts tell the unmasked kernel apart.
    grid += [_decodes(b, c) for b in batches for c in decode_contexts]
    grid += [[Chunk(1, c)] * b for b in batches[1::2] for c in (decode_contexts[0], middle)]
    for b in mixed_decodes:
        for n, c in itertools.product((chunks[0], chunks[len(chunks) // 2], budget - b), (0, contexts[-1])):
            if n > 1:
                grid.append(_decodes(b, middle) + [Chunk(n, c)])
    seen, out = set(), []
    for step in grid:
        step = _shrink(step, limits)
        key = tuple((c.new_tokens, c.context, c.samples) for c in step)
        if key not in seen and limits.allows(step):
            seen.add(key)
            out.append(step)
    return out


def _decodes(batch: int, context: int) -> list[Chunk]:
    """`batch` decodes with contexts spread evenly over [context / 2, context * 3 / 2]."""
    if batch == 1:
        return [Chunk(1, context)]
    return [Chunk(1, max(1, context // 2 + context * i // (batch - 1))) for i in range(batch)]


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
    """Builds a plan the way the Scheduler would: token slices of a made-up prompt, blocks from a real BlockManager."""

    def __init__(self, block_manager: BlockManager, vocab_size: int) -> None:
        self.block_manager = block_manager
        self.vocab_size = vocab_size
        self._ids = itertools.count()

    def build(self, step: list[Chunk]) -> SchedulerOutput:
        plan = SchedulerOutput()
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for chunk in step:
            request_id = f"profile-{next(self._ids)}"
            end = chunk.context + chunk.new_tokens
            if not self.block_manager.allocate_slots(request_id, end):
                self.block_manager.free(request_id)
                self.release(plan)
                raise ValueError(f"the KV cache cannot hold step {step}")
            plan.scheduled.append(ScheduledRequest(
                request_id=request_id,
                token_ids=[(7 * i + 3) % self.vocab_size for i in range(chunk.context, end)],
                num_computed_tokens=chunk.context,
                num_new_tokens=chunk.new_tokens,
                samples=chunk.samples,
                block_table=list(self.block_manager.block_tables[request_id]),
                sampling_params=params,
            ))
        return plan

    def release(self, plan: SchedulerOutput) -> None:
        for s in plan.scheduled:
            self.block_manager.free(s.request_id)


def shape_of(step: list[Chunk]) -> StepShape:
    return StepShape([c.new_tokens for c in step], [c.context for c in step], [c.samples for c in step])
