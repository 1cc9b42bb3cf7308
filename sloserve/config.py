"""Engine configuration: the model to load and the knobs of scheduling and the KV cache."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from sloserve.engine.scheduler import SchedulerConfig
from sloserve.spec.config import SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
QUANTIZATIONS = ("int8",)  # sloserve/model/quantization.py


@dataclass(slots=True)
class EngineConfig:
    model: str
    load_format: str = "auto"
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype, float32 where it says nothing
    seed: int = 0
    device: str = "auto"  # "auto": CUDA where PyTorch sees a GPU, else the CPU
    block_size: int = 16
    # KV capacity: an explicit block count wins over a memory budget, which wins over GPU utilization.
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None  # None: 1 GiB on a CPU; on CUDA, gpu_memory_utilization decides
    # Share of the GPU's memory this engine may hold (weights, activations, KV cache), as vLLM's flag.
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"  # auto | cpu | triton (auto: triton on CUDA)
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    tokenizer: str | None = None  # a directory or hub id; None: the model's own
    revision: str | None = None  # hub revision (branch, tag or commit) of a hub id
    download_dir: str | None = None  # Hugging Face cache directory (None: the default cache)
    skip_tokenizer_init: bool = False  # no tokenizer: prompts and outputs are token ids only
    # sloserve's C++ CPU kernels for the small per-layer ops (built on first use); False: plain PyTorch ops.
    use_kernels: bool = True
    policy: str = "fcfs"  # scheduling policy: fcfs | priority | slo
    enable_prefix_caching: bool = True  # reuse the KV of prompt prefixes other requests computed
    quantization: str | None = None  # "int8": weight-only, per-output-channel scales (vLLM's --quantization)
    # vLLM's speculative_config: a dict (or its JSON text) such as {"method": "ngram", "num_speculative_tokens": 3}.
    speculative_config: SpeculativeConfig | dict | str | None = None
    # Every position computed as a plain decode of it (prompt rows too: decode attention, the row-independent
    # matmul kernel), so no number depends on what else a step holds or how a prompt was chunked; prefill is
    # slower. Default: vLLM's VLLM_BATCH_INVARIANT=1 environment variable. CPU kernels only.
    batch_invariant: bool = field(default_factory=lambda: os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1")

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"unknown load_format {self.load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        self.scheduler_config()  # validates the scheduler's knobs and the policy name
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown device {self.device!r}; choose from auto, cpu, cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.block_size, self.policy,
                               self.enable_prefix_caching)
