"""ModelExecutor: turns a scheduler plan into batch tensors, runs the model, samples."""
from __future__ import annotations

import torch

from sloserve.config import EngineConfig
from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from sloserve.model.attention import AttentionMetadata, PrefillSpan
from sloserve.model.loader import LoadedModel
from sloserve.model.sampler import Sampler
from sloserve.request import Request


def token_slice(request: Request, start: int, end: int) -> list[int]:
    prompt = request.prompt_token_ids
    if end <= len(prompt):
        return prompt[start:end]
    return (prompt + request.output_token_ids)[start:end]


class ModelExecutor:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.model = loaded.model
        self.block_size = config.block_size
        shape = self.model.shape
        bytes_per_block = 2 * shape.num_layers * config.block_size * shape.num_kv_heads * shape.head_dim
        bytes_per_block *= loaded.dtype.itemsize
        self.num_kv_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // bytes_per_block)
        # Zeroed, not empty: padded gathers read unused slots, and NaN garbage would survive masking.
        cache = torch.zeros(
            shape.num_layers, 2, self.num_kv_blocks * config.block_size, shape.num_kv_heads, shape.head_dim,
            dtype=loaded.dtype, device=config.device,
        )
        self.kv_caches = [(layer[0], layer[1]) for layer in cache]
        self.device = config.device
        self.sampler = Sampler(config.seed)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> list[int | None]:
        self.sampler.forget(plan.finished_request_ids)
        # Decode rows (one new token) first, then prefill chunks: attention batches the former.
        decodes = [s for s in plan.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in plan.scheduled if s.num_new_tokens > 1]
        ordered = decodes + prefills
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for s in ordered:
            start, table = s.request.num_computed_tokens, s.block_table
            end = start + s.num_new_tokens
            input_ids += token_slice(s.request, start, end)
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if s.samples:
                sample_rows.append(len(positions) - 1)
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), block_size=bs)
        if decodes:
            self._decode_metadata(meta, decodes)
        row = len(decodes)
        for s in prefills:
            meta.prefills.append(self._prefill_span(row, s))
            row += s.num_new_tokens
        if not sample_rows:
            self.model(self._tensor(input_ids), self._tensor(positions), meta, self.kv_caches, self._tensor([0]))
            return [None] * len(plan.scheduled)
        logits = self.model(self._tensor(input_ids), self._tensor(positions), meta, self.kv_caches, self._tensor(sample_rows))
        sampling = [s for s in ordered if s.samples]
        tokens = self.sampler.sample(
            logits, [s.request.request_id for s in sampling], [s.request.sampling_params for s in sampling],
            [s.request for s in sampling],
        )
        by_request = {id(s): t for s, t in zip(sampling, tokens)}
        return [by_request.get(id(s)) for s in plan.scheduled]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_metadata(self, meta: AttentionMetadata, decodes: list[ScheduledRequest]) -> None:
        contexts = [s.request.num_computed_tokens + 1 for s in decodes]
        num_blocks = -(-max(contexts) // self.block_size)
        meta.num_decodes = len(decodes)
        meta.max_context = max(contexts)
        meta.context_lens = self._tensor(contexts)
        meta.block_tables = self._tensor(
            [s.block_table[:num_blocks] + [0] * (num_blocks - len(s.block_table)) for s in decodes]
        )

    def _prefill_span(self, row: int, s: ScheduledRequest) -> PrefillSpan:
        start, n = s.request.num_computed_tokens, s.num_new_tokens
        if start == 0:  # no cached context: plain causal attention over the chunk itself
            return PrefillSpan(row, row + n, None, None)
        bs, table, context = self.block_size, s.block_table, start + n
        gather = self._tensor([table[p // bs] * bs + p % bs for p in range(context)])
        queries = torch.arange(start, context, device=self.device)[:, None]
        mask = torch.arange(context, device=self.device)[None, :] <= queries
        return PrefillSpan(row, row + n, gather, mask)
