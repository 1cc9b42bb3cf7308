"""The CUDA path's Triton kernels compute what the CPU path computes. Without a GPU they run under
Triton's interpreter (same kernel code, executed by NumPy), so CI checks their arithmetic too."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import
pytest.importorskip("triton")

from sloserve import LLM, SamplingParams  # noqa: E402
from sloserve.model.attention import SequenceRows  # noqa: E402
from sloserve.model.attention.cpu import CpuAttention  # noqa: E402
from sloserve.model.attention.triton_backend import TritonAttention  # noqa: E402
from sloserve.model.cuda_graphs import bucket_for, capture_sizes  # noqa: E402
from sloserve.model.ops import TorchOps  # noqa: E402
from sloserve.model.triton_ops import TritonOps  # noqa: E402

from tests.model.test_hf_equivalence import hf_greedy, MAX_TOKENS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Triton's interpreter truncates float32 to bfloat16 where a GPU rounds to nearest even, so on a CPU the
# kernels' bfloat16 results are checked to one rounding step, on a GPU bit for bit.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def assert_same_rounding(fast, ref):
    if INTERPRETED and fast.dtype == torch.bfloat16:
        torch.testing.assert_close(fast, ref, **TOLERANCE[torch.bfloat16])
    else:
        assert torch.equal(fast, ref)


def rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@DTYPES
def test_norms_and_silu_match_the_reference(dtype):
    fast, ref = TritonOps(), TorchOps()
    x, residual, w = rand(5, 96, dtype=dtype), rand(5, 96, dtype=dtype, seed=1), rand(96, dtype=dtype, seed=2)
    torch.testing.assert_close(fast.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **TOLERANCE[dtype])
    r_fast, r_ref = residual.clone(), residual.clone()
    out = fast.add_rms_norm_(x.clone(), r_fast, w, 1e-6)
    assert_same_rounding(r_fast, residual + x)  # one rounded add
    torch.testing.assert_close(out, ref.add_rms_norm_(x.clone(), r_ref, w, 1e-6), **TOLERANCE[dtype])
    gate_up = rand(3, 2 * 80, dtype=dtype, seed=3)
    torch.testing.assert_close(fast.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), **TOLERANCE[dtype])


@DTYPES
def test_rope_and_cache_write_match_the_reference(dtype):
    heads, kv_heads, head_dim, tokens = 4, 2, 32, 6
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    cos, sin = rand(tokens, head_dim, dtype=dtype, seed=1), rand(tokens, head_dim, dtype=dtype, seed=2)
    slots = torch.tensor([9, 2, 17, 5, 30, 11], device=DEVICE)
    results = []
    for ops in (TritonOps(), TorchOps()):
        q = qkv.clone()
        k_cache = torch.zeros(32, kv_heads, head_dim, dtype=dtype, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        ops.rope_and_cache_(q, cos, sin, k_cache, v_cache, slots, heads, kv_heads, head_dim)
        results.append((q, k_cache, v_cache))
    for fast, ref in zip(*results):
        assert_same_rounding(fast, ref)  # each step rounds where PyTorch rounds


@DTYPES
@pytest.mark.parametrize("block_size", [4, 16])
def test_varlen_attention_matches_the_cpu_backend(dtype, block_size):
    """Decodes and prefill chunks (with and without cached context) in one call, blocks shuffled, GQA."""
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bfloat16 matrices wrongly; checked on a GPU")
    heads, kv_heads, head_dim = 8, 2, 32
    seqs = [(40, 1), (3, 1), (70, 1), (0, 1), (0, 23), (29, 17)]  # (cached tokens, new tokens); decodes first
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    rows, next_block = [], 0
    for cached, new in seqs:
        used = -(-(cached + new) // block_size)
        rows.append(SequenceRows(cached, new, order[next_block : next_block + used]))
        next_block += used
    k_cache = rand(num_blocks * block_size, kv_heads, head_dim, dtype=dtype, seed=1)
    v_cache = rand(num_blocks * block_size, kv_heads, head_dim, dtype=dtype, seed=2)
    tokens = sum(n for _, n in seqs)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv.view(tokens, -1, head_dim)[:, :heads]  # strided rows, as the model passes them
    slots = [r.block_table[p // block_size] * block_size + p % block_size for r in rows for p in range(r.start, r.start + r.num_new)]
    # Attention reads this step's keys from the cache: put them there, as rope_and_cache_ does.
    k_new, v_new = qkv.view(tokens, -1, head_dim)[:, heads : heads + kv_heads], qkv.view(tokens, -1, head_dim)[:, heads + kv_heads :]
    k_cache[slots], v_cache[slots] = k_new, v_new
    slot_mapping = torch.tensor(slots, device=DEVICE)
    outs = []
    for backend in (TritonAttention(DEVICE, block_size), CpuAttention(DEVICE, block_size, TorchOps())):
        meta = backend.prepare(rows, slot_mapping)
        outs.append(backend.forward(q, k_new, v_new, k_cache, v_cache, meta, 0.3))
    torch.testing.assert_close(outs[0], outs[1], **TOLERANCE[dtype])


def test_graph_buckets_cover_every_batch_size():
    sizes = capture_sizes(44)
    assert sizes == [1, 2, 4, 8, 16, 24, 32, 40, 44]
    assert [bucket_for(sizes, n) for n in (1, 3, 5, 9, 40, 41, 44)] == [1, 4, 8, 16, 40, 44, 44]


def test_greedy_on_the_triton_path_matches_transformers(tiny_model_dir):
    """The whole CUDA-path model (Triton attention and small ops) against transformers, with chunked
    prefill and with preemption. Qwen3: grouped-query attention and the q/k norms too."""
    kind = "qwen3"
    model_dir = tiny_model_dir(kind)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
    expected = hf_greedy(model_dir, prompts)
    for knobs in (dict(max_num_batched_tokens=16), dict(block_size=4, num_kv_blocks=24)):
        llm = LLM(str(model_dir), dtype="float32", attention_backend="triton", **knobs)
        assert isinstance(llm.engine.executor.model.ops, TritonOps)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        assert [o.outputs[0].token_ids for o in outs] == expected, f"{kind} differs under {knobs}"
        if "num_kv_blocks" in knobs:
            assert sum(o.num_preemptions for o in outs) > 0
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
