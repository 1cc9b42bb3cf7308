"""How many KV-cache blocks an executor allocates: an explicit count, a memory budget, or (CUDA) what
the GPU has left under --gpu-memory-utilization once weights and a full-budget step's activations fit."""
from __future__ import annotations

import torch

from sloserve.config import EngineConfig
from sloserve.model.attention import SequenceRows

CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_block_bytes(model, config: EngineConfig, dtype: torch.dtype) -> int:
    shape = model.shape
    return 2 * shape.num_layers * config.block_size * shape.num_kv_heads * shape.head_dim * dtype.itemsize


def kv_cache_blocks(model, config: EngineConfig, dtype: torch.dtype) -> int:
    if config.num_kv_blocks:
        return config.num_kv_blocks
    per_block = kv_block_bytes(model, config, dtype)
    if config.kv_cache_memory_bytes is not None or not config.device.startswith("cuda"):
        return max(1, (config.kv_cache_memory_bytes or CPU_DEFAULT_KV_BYTES) // per_block)
    device = torch.device(config.device)
    peak = _activation_peak_bytes(model, config, dtype, device)
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # the CUDA context, other processes
    budget = int(config.gpu_memory_utilization * total) - others - torch.cuda.memory_allocated(device) - peak
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"no GPU memory is left for the KV cache at gpu_memory_utilization={config.gpu_memory_utilization} "
            f"(weights {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB, step activations {peak / 2**30:.1f} GiB, "
            f"others {others / 2**30:.1f} GiB of {total / 2**30:.1f} GiB): raise it or lower max_num_batched_tokens"
        )
    return blocks


@torch.inference_mode()
def _activation_peak_bytes(model, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Run the largest step the scheduler can plan (max_num_batched_tokens of prefill) over a scratch
    cache of one block, and measure the memory it needed beyond the weights (vLLM's profile run)."""
    shape, bs = model.shape, config.block_size
    tokens = config.max_num_batched_tokens
    scratch = [(torch.zeros(bs, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device),) * 2
               for _ in range(shape.num_layers)]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    slots = torch.arange(tokens, device=device) % bs  # every token's key lands in the one scratch block
    meta = model.attention.prepare([SequenceRows(0, tokens, [0] * -(-tokens // bs))], slots)
    positions = torch.arange(tokens, device=device) % model.cos_table.shape[0]
    rows = torch.arange(min(tokens, config.max_num_seqs), device=device)
    model(torch.zeros(tokens, dtype=torch.long, device=device), positions, meta, scratch, rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak
