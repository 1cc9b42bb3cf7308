"""A decode step's fused layer stack (one C++ call for every layer) computes exactly what the layers
compute one op at a time, in every dtype, on ragged batches, in every matmul body this CPU runs."""
import pytest
import torch

from sloserve.config import EngineConfig
from sloserve.model.attention import SequenceRows
from sloserve.model.kernels import cpu_flags
from sloserve.model.loader import load_model
from sloserve.model.skinny import ISA_ENV, ISAS

RUNNABLE = [name for name, (_, needs) in ISAS.items() if needs <= cpu_flags()]
# (model dtype, quantization)
VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8")}
# Ragged contexts across blocks; 16 rows is more than every x tile of the matmul and splits attention
# by whole requests instead of by KV head (threads then take runs of equal context, not of equal count).
# A (context, rows) pair is a speculative verification of rows - 1 drafts; 40 decodes are more rows than
# oneDNN's smallest batch.
BATCHES = {"one": [1], "ragged": [1, 7, 33, 16, 50], "sixteen": [3 + 5 * i for i in range(16)],
           "sixteen_shuffled": [(37 * i) % 61 + 1 for i in range(16)], "verifications": [9, (30, 5), 2, (4, 3)],
           "forty": [(11 * i) % 45 + 1 for i in range(40)]}


def load(model_dir, dtype, quantization):
    config = EngineConfig(model=str(model_dir), dtype=dtype, quantization=quantization, device="cpu",
                          skip_tokenizer_init=True)
    return load_model(config).model


def decode_step(model, contexts, seed=0):
    """Inputs of one decode step: each request's context in shuffled blocks of a random-filled cache."""
    g = torch.Generator().manual_seed(seed)
    s, dtype, block = model.shape, model.embed_tokens.weight.dtype, model.attention.block_size
    contexts = [c if isinstance(c, tuple) else (c, 1) for c in contexts]
    blocks_each = [-(-(n + new) // block) for n, new in contexts]
    order = torch.randperm(sum(blocks_each), generator=g).tolist()
    rows, first = [], 0
    for (n, new), count in zip(contexts, blocks_each):
        rows.append(SequenceRows(n, new, order[first : first + count], as_decodes=new > 1))
        first += count
    positions = torch.tensor([p for r in rows for p in range(r.start, r.start + r.num_new)])
    slots = torch.tensor([r.block_table[p // block] * block + p % block for r in rows
                          for p in range(r.start, r.start + r.num_new)])
    caches = [tuple(torch.randn(len(order) * block, s.num_kv_heads, s.head_dim, generator=g).to(dtype) for _ in "kv")
              for _ in range(s.num_layers)]
    ids = torch.randint(2, s.vocab_size, (len(positions),), generator=g)
    return rows, slots, ids, positions, caches


def forward(model, step, fused: bool):
    rows, slots, ids, positions, caches = step
    caches = [(k.clone(), v.clone()) for k, v in caches]
    meta = model.attention.prepare(rows, slots)
    assert model.decode_stack.runs(meta, len(ids))
    stack, model.decode_stack = model.decode_stack, model.decode_stack if fused else None
    try:
        with torch.inference_mode():
            logits = model(ids, positions, meta, caches, torch.arange(len(ids)))
    finally:
        model.decode_stack = stack
    return logits, caches


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])  # q/k/v biases; per-head q/k norms (head_dim 32)
def test_fused_stack_equals_the_layers(kind, variant, isa, tiny_model_dir, monkeypatch, built_kernels):
    assert built_kernels is not None, "sloserve's C++ kernels failed to build"  # or nothing below is fused
    monkeypatch.setenv(ISA_ENV, isa)
    model = load(tiny_model_dir(kind), *VARIANTS[variant])
    assert model.decode_stack is not None and model.layers[0].qkv_proj.skinny.isa == isa
    for name, contexts in BATCHES.items():
        step = decode_step(model, contexts)
        (fused, fused_caches), (layers, layer_caches) = forward(model, step, True), forward(model, step, False)
        assert torch.equal(fused, layers), f"{kind} {variant} {isa}: logits differ on the {name} batch"
        for (k, v), (k_ref, v_ref) in zip(fused_caches, layer_caches):
            assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        assert not torch.equal(fused_caches[0][0], step[4][0][0])  # the step wrote its keys


def test_steps_of_decode_rows_only_are_fused(tiny_model_dir, built_kernels):
    model = load(tiny_model_dir("smollm"), "bfloat16", None)
    stack = model.decode_stack

    def fused(rows):
        tokens = sum(r.num_new for r in rows)
        return stack.runs(model.attention.prepare(rows, torch.zeros(tokens, dtype=torch.long)), tokens)

    decodes = [SequenceRows(5, 1, [0, 1])] * 40  # however many: decode rows always take the skinny kernel
    assert fused(decodes)
    assert fused(decodes[:3] + [SequenceRows(5, 4, [0, 1, 2], as_decodes=True)])  # a verification's rows are decode rows
    assert not fused(decodes[:2] + [SequenceRows(0, 3, [2])])  # a prompt chunk needs prefill attention
    assert not fused(decodes[:2] + [SequenceRows(5, 3, [0, 1, 2])])  # so does one with cached context


def test_no_fused_stack_without_the_kernels(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir("smollm")), dtype="float32", device="cpu", use_kernels=False,
                          skip_tokenizer_init=True)
    assert load_model(config).model.decode_stack is None
