"""Shared fixtures: tiny random-weight Hugging Face models built from real configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # Larger than the usual 0.02 so that random logits have clear winners: greedy comparisons
    # then test the arithmetic, not float ties.
    initializer_range=0.2,
    eos_token_id=1,
    bos_token_id=0,
)

@pytest.fixture(scope="session", autouse=True)
def built_kernels():
    """Compile sloserve's C++ kernels (once per machine, ~30 s) before any test starts a server
    subprocess with a startup deadline: on a fresh machine the first engine would compile them."""
    from sloserve.model.kernels import load_kernels

    return load_kernels()


CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }),
    "smollm": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY, use_sliding_window=False),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, use_sliding_window=False),
}


def save_tiny_model(kind: str, path: Path, seed: int = 0, initializer_range: float | None = None) -> Path:
    """initializer_range: smaller than TINY's for logits with near ties (tests of exact arithmetic)."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    if initializer_range is not None:
        config.initializer_range = initializer_range
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function kind -> directory holding that tiny model (built once per session)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_model(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get
