"""A greedy draft's k tokens for a batch of requests: one forward pass per token, laid out straight as the draft
executor's batch rows. No scheduler plan, sampler, token histories or per-token host copy: on a small draft those,
not its arithmetic, were most of a draft step (a 4-layer draft's step cost half the 6-layer target's). A sampled draft
keeps DraftModelProposer's per-step path, which keeps the distributions it drew from for rejection sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sloserve.engine.clock import Clock
from sloserve.engine.features import StepShape
from sloserve.model.attention import SequenceRows
from sloserve.model.runner import ModelExecutor

# A feed of at most this many tokens (what the target accepted since the last proposal: up to k + 1) runs as decode
# rows, as a verification's do: one fused decode-stack call, each position's numbers those of its plain decode.
# Longer feeds (a request's first proposal feeds its prompt) are prefill chunks.
MAX_DECODE_FEED = 16


@dataclass(slots=True)
class GreedyRow:
    """One request to draft for: `feed` goes into the draft's cache at positions start.., then k tokens are drafted."""

    start: int  # tokens already in the draft's cache
    feed: list[int]
    block_table: list[int]  # with slots for start + len(feed) + k - 1 tokens (the last draft is never fed)
    k: int


@dataclass(slots=True)
class Drafted:
    tokens: list[list[int]]  # per row, its k drafts
    # Measured draft steps for the draft's step-time predictor: the feeding step, and the rest as one of their shapes
    # at their mean time (so a proposal costs two observations, not k).
    observations: list[tuple[StepShape, float]]


def draft_greedy(executor: ModelExecutor, rows: list[GreedyRow], clock: Clock) -> Drafted:
    bs = executor.block_size
    # Decode rows first, as the CPU backend wants them.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].feed) > MAX_DECODE_FEED)
    seqs, ids, positions, slots, last = [], [], [], [], []
    for i in order:
        r = rows[i]
        seqs.append(SequenceRows(r.start, len(r.feed), r.block_table, as_decodes=len(r.feed) <= MAX_DECODE_FEED))
        ids += r.feed
        positions += range(r.start, r.start + len(r.feed))
        slots += [r.block_table[p // bs] * bs + p % bs for p in range(r.start, r.start + len(r.feed))]
        last.append(len(positions) - 1)
    start = clock.now()
    tokens = executor.run_rows(seqs, ids, positions, slots, last).max(dim=-1).indices
    _sync(executor.device)
    first = clock.now() - start
    observations = [(StepShape([len(s.feed) for s in rows], [s.start for s in rows], [True] * len(rows)), first)]
    steps = [(list(order), tokens)]  # per step: the rows (indices into `rows`) it drafted for, and their tokens
    position = {i: rows[i].start + len(rows[i].feed) for i in order}
    shapes = []
    for step in range(1, max(r.k for r in rows)):
        active, ids = steps[-1]
        keep = [j for j, i in enumerate(active) if rows[i].k > step]
        if len(keep) < len(active):
            active, ids = [active[j] for j in keep], ids[torch.tensor(keep, device=ids.device)]
        seqs = [SequenceRows(position[i], 1, rows[i].block_table) for i in active]
        at = [position[i] for i in active]
        slots = [rows[i].block_table[p // bs] * bs + p % bs for i, p in zip(active, at)]
        logits = executor.run_rows(seqs, ids, at, slots, list(range(len(active))))
        steps.append((active, logits.max(dim=-1).indices))
        shapes.append(StepShape([1] * len(active), at, [True] * len(active)))
        for i in active:
            position[i] += 1
    drafted = iter(torch.cat([t for _, t in steps]).tolist())  # one host copy for every step
    out: list[list[int]] = [[] for _ in rows]
    for active, _ in steps:
        for i in active:
            out[i].append(next(drafted))
    if shapes:
        observations.append((shapes[len(shapes) // 2], (clock.now() - start - first) / len(shapes)))
    return Drafted(out, observations)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the step's time is the device's, not its launch's
