"""CUDA graphs of decode-only steps: one graph per batch-size bucket, a step padded up to its bucket.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python the CPU is
the bottleneck. Captured once per bucket and replayed, a step costs one launch. The graphs read their
inputs from static buffers, which each step fills; padding rows write their keys and values into a
sink block no request owns, and attend to it alone.
"""
from __future__ import annotations

import torch

from sloserve.model.attention import SequenceRows
from sloserve.model.attention.triton_backend import VarlenMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    return sorted(set(sizes) | {max_num_seqs})


def bucket_for(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, max_model_len: int,
                 sink_block: int) -> None:
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.sink_block = sink_block
        device = model.embed_tokens.weight.device
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        long, int32 = dict(dtype=torch.long, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.slot_mapping = torch.full((n,), sink_block * block_size, **long)
        self.seq_lens = torch.ones(n, **int32)
        self.query_start_loc = torch.arange(n + 1, **int32)  # one query row per request
        self.block_tables = torch.full((n, width), sink_block, **int32)
        self.sample_rows = torch.arange(n, **long)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def fits(self, num_requests: int) -> bool:
        return num_requests <= self.sizes[-1]

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            meta = VarlenMetadata(self.slot_mapping[:size], self.query_start_loc[: size + 1], self.seq_lens[:size],
                                  self.block_tables[:size], max_query_len=1, block_size=self.block_size)

            def step(size=size, meta=meta):
                return self.model(self.input_ids[:size], self.positions[:size], meta, self.kv_caches,
                                  self.sample_rows[:size])

            step()  # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step()
            pool = graph.pool()
            self.graphs[size] = (graph, logits)

    def run(self, rows: list[SequenceRows], input_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits of each row (one per request), from the bucket's graph."""
        n = len(rows)
        size = bucket_for(self.sizes, n)
        pad = size - n
        sink_slot = self.sink_block * self.block_size
        self.input_ids[:size].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slots + [sink_slot] * pad), non_blocking=True)
        self.seq_lens[:size].copy_(torch.tensor([r.start + 1 for r in rows] + [1] * pad, dtype=torch.int32),
                                   non_blocking=True)
        # Only the columns this step's contexts reach are read; older values beyond them are never looked at.
        width = max(-(-(r.start + 1) // self.block_size) for r in rows)
        tables = [r.block_table[:width] + [self.sink_block] * (width - len(r.block_table)) for r in rows]
        tables += [[self.sink_block] * width] * pad
        self.block_tables[:size, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
