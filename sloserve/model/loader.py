"""Load a local Hugging Face model directory: config, safetensors weights (or seeded random ones), tokenizer."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sloserve.config import DTYPES, EngineConfig
from sloserve.model.attention import select_backend, uses_triton
from sloserve.model.huge_pages import move_weights_to_huge_pages
from sloserve.model.llama import LlamaForCausalLM, ModelShape
from sloserve.model.ops import KernelOps, select_ops
from sloserve.model.resolve import TOKENIZER_FILES, custom_code_of, has_tokenizer, resolve_model_dir
from sloserve.model.skinny import select_isa

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    tokenizer: object | None  # a transformers tokenizer, when the directory has one


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
    # Never the repository's own code: supported architectures are implemented here.
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError:
        if custom_code_of(path):
            raise ValueError(_custom_code_message(path)) from None
        raise
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        custom = f"; {_custom_code_message(path)}" if custom_code_of(path) else ""
        raise ValueError(f"model type {config.model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}{custom}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("MLP biases (mlp_bias=True) are not supported")
    return config


def _custom_code_message(path: Path) -> str:
    return (f"the model needs its own Python code ({', '.join(custom_code_of(path))} in its auto_map), which "
            "sloserve never runs, --trust-remote-code or not")


def model_shape(config: PretrainedConfig) -> ModelShape:
    heads = config.num_attention_heads
    return ModelShape(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        o_bias=config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False)),
        qk_norm=config.model_type == "qwen3",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def rope_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and output scale; scaled variants (llama3, yarn, ...) come from transformers."""
    params = config.rope_parameters or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", 10000.0)
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def resolve_dtype(config: PretrainedConfig, requested: str) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    checkpoint = getattr(config, "dtype", None)
    return checkpoint if checkpoint in DTYPES.values() else torch.float32


def resolve_max_model_len(config: PretrainedConfig, requested: int | None) -> int:
    limit = config.max_position_embeddings
    # Without sliding-window attention, outputs beyond the window would differ from the model's.
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    if requested is None:
        return limit
    if not 0 < requested <= limit:
        raise ValueError(f"max_model_len {requested} must be in [1, {limit}] for this model")
    return requested


def eos_token_ids(model_dir: Path, config: PretrainedConfig) -> frozenset[int]:
    eos = config.eos_token_id
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])


def load_model(cfg: EngineConfig) -> LoadedModel:
    model_dir = resolve_model_dir(cfg.model, cfg.revision, cfg.download_dir)
    config = load_hf_config(model_dir)
    shape = model_shape(config)
    dtype = resolve_dtype(config, cfg.dtype)
    max_model_len = resolve_max_model_len(config, cfg.max_model_len)
    inv_freq, rope_scale = rope_frequencies(config, shape.head_dim)
    device = torch.device(cfg.device)
    ops = select_ops(dtype, device, cfg.use_kernels, triton=uses_triton(cfg.attention_backend, device))
    attention = select_backend(cfg.attention_backend, device, cfg.block_size, ops)
    # Parameters are made on the device in the model dtype: an 8B model never passes through the CPU
    # or float32. (The RoPE tables are built in float32 explicitly.)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(shape, inv_freq, rope_scale, max_model_len, ops, attention)
    finally:
        torch.set_default_dtype(default_dtype)
    if cfg.load_format == "dummy":
        init_dummy_weights(model, getattr(config, "initializer_range", 0.02), cfg.seed)
    else:
        model.load_state_dict(read_hf_weights(model_dir, shape, device), strict=True)
    model.to(dtype).eval().requires_grad_(False)
    kernels = ops.kernels if isinstance(ops, KernelOps) else None
    if cfg.batch_invariant and kernels is None:
        raise ValueError("batch-invariant mode needs sloserve's CPU kernels (a CPU device, float32 or bfloat16, "
                         "kernels on and built): other matmuls and attention round by the shape of the batch")
    model.prepare_weights(kernels, select_isa() if kernels is not None else "portable", cfg.quantization)
    move_weights_to_huge_pages(model)  # CPU weights only; decode streams them at memory speed there
    tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(cfg, model_dir)
    return LoadedModel(model, dtype, max_model_len, shape.vocab_size, eos_token_ids(model_dir, config), tokenizer)


def load_tokenizer(cfg: EngineConfig, model_dir: Path):
    """The tokenizer of --tokenizer (a directory or hub id) or of the model; None where there is none."""
    tokenizer_dir = resolve_model_dir(cfg.tokenizer, cfg.revision, cfg.download_dir, need_config=False) if cfg.tokenizer else model_dir
    if not has_tokenizer(tokenizer_dir):
        if cfg.tokenizer:
            raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
        return None
    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)


def init_dummy_weights(model: LlamaForCausalLM, std: float, seed: int) -> None:
    """Seeded random weights, as a checkpoint would have them: normal matrices, unit norms, zero biases.
    Drawn on the model's device (a GPU draws 8B values in well under a second), so the same seed gives
    other values on a GPU than on a CPU."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.copy_(torch.randn(param.shape, generator=generator, device=device) * std)


def read_hf_weights(model_dir: Path, shape: ModelShape, device: torch.device) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files (use load_format='dummy' for random weights)")
    hf: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                hf[key] = f.get_tensor(key)
    return to_fused_state_dict(hf, shape)


def to_fused_state_dict(hf: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Map Hugging Face parameter names onto ours, concatenating q|k|v and gate|up."""

    def take(name: str) -> torch.Tensor:
        try:
            return hf[name]
        except KeyError:
            raise ValueError(f"checkpoint is missing weight {name!r}") from None

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    out["lm_head.weight"] = out["embed_tokens.weight"] if shape.tie_word_embeddings else take("lm_head.weight")
    for i in range(shape.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "qkv_proj.weight"] = torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"])
        if shape.qkv_bias:
            out[dst + "qkv_proj.bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
        out[dst + "o_proj.weight"] = take(attn + "o_proj.weight")
        if shape.o_bias:
            out[dst + "o_proj.bias"] = take(attn + "o_proj.bias")
        if shape.qk_norm:
            out[dst + "q_norm.weight"] = take(attn + "q_norm.weight")
            out[dst + "k_norm.weight"] = take(attn + "k_norm.weight")
        mlp = src + "mlp."
        out[dst + "gate_up_proj.weight"] = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
        out[dst + "down_proj.weight"] = take(mlp + "down_proj.weight")
    return out
