"""sloserve's C++ kernels compute what the PyTorch reference ops compute."""
import pytest
import torch

from sloserve.model.attention.cpu import AttentionMetadata
from sloserve.model.ops import KernelOps, TorchOps

# float32: only the order of a sum differs; bfloat16: one rounding step of the model dtype.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.fixture(scope="module")
def ops(built_kernels):
    kernels = built_kernels
    # This machine has a compiler: the kernels must build here, or every test below would pass vacuously.
    assert kernels is not None, "sloserve's C++ kernels failed to build"
    return KernelOps(kernels), TorchOps()


def rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@DTYPES
def test_rms_norm(ops, dtype):
    fast, ref = ops
    x, w = rand(5, 96, dtype=dtype), rand(96, dtype=dtype, seed=1)
    torch.testing.assert_close(fast.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **TOLERANCE[dtype])


@DTYPES
def test_add_rms_norm_updates_the_residual(ops, dtype):
    fast, ref = ops
    x, residual, w = rand(7, 64, dtype=dtype), rand(7, 64, dtype=dtype, seed=1), rand(64, dtype=dtype, seed=2)
    r_fast, r_ref = residual.clone(), residual.clone()
    out_fast = fast.add_rms_norm_(x.clone(), r_fast, w, 1e-6)
    out_ref = ref.add_rms_norm_(x.clone(), r_ref, w, 1e-6)
    assert torch.equal(r_fast, r_ref)  # one rounded add: exact in either dtype
    assert torch.equal(r_fast, residual + x)
    torch.testing.assert_close(out_fast, out_ref, **TOLERANCE[dtype])


@DTYPES
def test_silu_and_mul(ops, dtype):
    fast, ref = ops
    x = rand(3, 2 * 80, dtype=dtype)
    torch.testing.assert_close(fast.silu_and_mul(x), ref.silu_and_mul(x), **TOLERANCE[dtype])


@DTYPES
def test_rope_and_cache(ops, dtype):
    fast, ref = ops
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 6
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    angles = rand(tokens, head_dim, dtype=torch.float32, seed=1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.tensor([9, 0, 3, 4, 12, 7])
    results = []
    for impl in (fast, ref):
        out, k_cache, v_cache = qkv.clone(), torch.zeros(16, kv_heads, head_dim, dtype=dtype), torch.zeros(16, kv_heads, head_dim, dtype=dtype)
        impl.rope_and_cache_(out, cos, sin, k_cache, v_cache, slots, heads, kv_heads, head_dim)
        results.append((out, k_cache, v_cache))
    (out, k_cache, v_cache), (out_ref, k_ref, v_ref) = results
    assert torch.equal(out, out_ref)  # the same elementwise roundings, no reduction
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(v_cache[slots], qkv.view(tokens, -1, head_dim)[:, heads + kv_heads :])
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any()


# Few requests split their KV heads across threads; many give each thread whole requests.
CONTEXTS = {"few": [1, 13], "many": [1, 13, 8, 30] + torch.randint(1, 40, (60,), generator=torch.Generator().manual_seed(5)).tolist()}


@DTYPES
@pytest.mark.parametrize("batch", CONTEXTS)
def test_decode_attention_reads_through_block_tables(ops, dtype, batch):
    """Ragged contexts spread over shuffled blocks, grouped-query heads, a strided query view."""
    fast, ref = ops
    block_size, heads, kv_heads, head_dim = 4, 6, 2, 32
    contexts = CONTEXTS[batch]
    num_blocks = sum(-(-n // block_size) for n in contexts)
    k_cache = rand(num_blocks * block_size, kv_heads, head_dim, dtype=dtype, seed=1)
    v_cache = rand(num_blocks * block_size, kv_heads, head_dim, dtype=dtype, seed=2)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    width = -(-max(contexts) // block_size)
    tables, start = [], 0
    for n in contexts:
        used = -(-n // block_size)
        tables.append(order[start : start + used] + [0] * (width - used))
        start += used
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(contexts), dtype=torch.long), block_size=block_size, num_decodes=len(contexts),
        block_tables=torch.tensor(tables), context_lens=torch.tensor(contexts), max_context=max(contexts),
    )
    qkv = rand(len(contexts), (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4)
    q = qkv.view(len(contexts), -1, head_dim)[:, :heads]  # rows strided, as the model passes it
    out = fast.decode_attention(q, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(out, ref.decode_attention(q, k_cache, v_cache, meta, 0.2), **TOLERANCE[dtype])
    # The first request sees one token: its output is that token's value, per KV head.
    first_slot = tables[0][0] * block_size
    expected = v_cache[first_slot].repeat_interleave(heads // kv_heads, dim=0)
    torch.testing.assert_close(out[0], expected, **TOLERANCE[dtype])


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    from sloserve.model.kernels import clear_stale_lock

    lock = tmp_path / "lock"
    assert not clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    assert not clear_stale_lock(tmp_path, max_age=600) and lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path, max_age=600) and not lock.exists()


def test_a_load_waits_out_a_live_build_and_removes_a_lock_that_goes_stale_while_it_waits(tmp_path):
    import os
    import time

    from sloserve.model.kernels import wait_for_build_lock

    lock = tmp_path / "lock"
    wait_for_build_lock(tmp_path)  # no lock: returns at once

    # Another process's build finishes while this one waits: its lock goes, the wait ends.
    lock.touch()
    naps = []

    def build_finishes(seconds):
        naps.append(seconds)
        if len(naps) == 3:
            lock.unlink()

    wait_for_build_lock(tmp_path, sleep=build_finishes)
    assert len(naps) == 3

    # A build killed part-way: its lock turns stale during the wait and is removed (PyTorch's own wait never would).
    lock.touch()

    def time_passes(seconds):
        old = time.time() - 3600
        os.utime(lock, (old, old))

    wait_for_build_lock(tmp_path, max_age=600, sleep=time_passes)
    assert not lock.exists()


def test_a_built_library_loads_without_touching_the_build_lock(built_kernels, monkeypatch):
    # PyTorch's builder takes the lock even when there is nothing to build; a process killed then left every
    # later load waiting. A library the build tag already names must load without the builder or its lock.
    from sloserve.model import kernels

    def waited(*args, **kwargs):
        raise AssertionError("waited on the build lock although the library is built")

    monkeypatch.setattr(kernels, "wait_for_build_lock", waited)
    kernels.load_kernels.cache_clear()
    try:
        fresh = kernels.load_kernels()
    finally:
        kernels.load_kernels.cache_clear()
    assert fresh is not None and hasattr(fresh, "decode_attention")
