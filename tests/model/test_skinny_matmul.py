"""The decode-sized matmul kernel computes x W^T + b as PyTorch does, in every body this CPU can run."""
import pytest
import torch
import torch.nn.functional as F

from sloserve.model.kernels import cpu_flags
from sloserve.model.linear import Linear
from sloserve.model.quantization import dequantize_int8, quantize_int8
from sloserve.model.skinny import ISA_ENV, ISAS, MAX_ROWS, SkinnyMatmul, best_isa, select_isa

# Every body this machine can run: the forced fallbacks (portable, avx2) as well as the fastest one.
RUNNABLE = [name for name, (_, needs) in ISAS.items() if needs <= cpu_flags()]
# Ragged on purpose: K not a multiple of any vector width, N not a multiple of the 4-row block,
# M across the x tiles (4 rows; 6 in the bfloat16 body: 5, 6, 7, 11, 12, 13 and 35 = 5 x 6 + 5) and
# beyond them. A long row (3000) crosses many vector steps and the integer dot products' partial sums.
SHAPES = [(1, 1, 1), (1, 7, 77), (3, 13, 130), (5, 33, 15), (6, 10, 40), (7, 11, 97), (11, 6, 64),
          (12, 9, 33), (13, 14, 50), (16, 9, 64), (17, 5, 33), (35, 21, 70), (2, 6, 3000)]
# float32: only the order of a sum differs; bfloat16: the output's one rounding step.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


@pytest.fixture(scope="module")
def kernels(built_kernels):
    assert built_kernels is not None, "sloserve's C++ kernels failed to build"  # or all below pass vacuously
    return built_kernels


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_this_machine_runs_the_fallbacks():
    # CI forces the slower bodies on the same CPU; they must be available for the tests to mean anything.
    assert {"portable", "avx2"} <= set(RUNNABLE)


# Float weights come in the model dtype (x's); int8 weights meet either.
PAIRS = {"fp32": ("float32", torch.float32), "bf16": ("bfloat16", torch.bfloat16),
         "int8_x_fp32": ("int8", torch.float32), "int8_x_bf16": ("int8", torch.bfloat16)}


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("weight_dtype, x_dtype", PAIRS.values(), ids=PAIRS.keys())
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_matches_pytorch_on_ragged_shapes(kernels, isa, weight_dtype, x_dtype, with_bias):
    for m, n, k in SHAPES:
        x, w = rand(m, k).to(x_dtype), rand(n, k, seed=1)
        bias = rand(n, seed=2).to(x_dtype) if with_bias else None
        if weight_dtype == "int8":
            w, scales = quantize_int8(w)
            effective = dequantize_int8(w, scales, torch.float32)
        else:
            w, scales = w.to(x_dtype), None
            effective = w.float()
        got = kernels.skinny_matmul(x, w, scales, bias, ISAS[isa][0])
        want = F.linear(x.float(), effective, None if bias is None else bias.float()).to(x_dtype)
        assert got.dtype == x_dtype and got.shape == (m, n)
        torch.testing.assert_close(got, want, **TOLERANCE[x_dtype], msg=lambda e: f"{(m, n, k)}: {e}")


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("weight_dtype, x_dtype", PAIRS.values(), ids=PAIRS.keys())
def test_a_rows_result_does_not_depend_on_its_batch(kernels, isa, weight_dtype, x_dtype):
    """Batch invariance: a row gives the same bits alone, in any tile position, in any batch up to the
    row limit. Speculative verification computes a token among k + 1 rows per request where plain
    decoding computed it among others; greedy identity between the two rests on this."""
    limit = MAX_ROWS[torch.int8 if weight_dtype == "int8" else x_dtype]
    x, w = rand(limit, 100).to(x_dtype), rand(45, 100, seed=1)
    w, scales = quantize_int8(w) if weight_dtype == "int8" else (w.to(x_dtype), None)
    full = kernels.skinny_matmul(x, w, scales, None, ISAS[isa][0])
    for m in (1, 2, 5, 7, 13, 16, 17, 31, limit):
        for first in {0, limit - m}:  # the same rows at the front and at the back of the x tiles
            got = kernels.skinny_matmul(x[first : first + m], w, scales, None, ISAS[isa][0])
            assert torch.equal(got, full[first : first + m]), f"{m} rows from row {first}"


@pytest.mark.parametrize("k", [65535, 70000], ids=["longest_vnni_row", "longer"])
def test_int8_rows_past_the_integer_path_stay_correct(kernels, k):
    """Rows too long for exact int32 sums in the VNNI body take the float32 one instead."""
    x = rand(1, k).to(torch.bfloat16)
    q, scales = quantize_int8(rand(3, k, seed=1))
    got = kernels.skinny_matmul(x, q, scales, None, ISAS[best_isa(cpu_flags())][0])
    want = F.linear(x.float(), dequantize_int8(q, scales, torch.float32)).to(torch.bfloat16)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])


def test_reads_strided_rows(kernels):
    x = rand(4, 96)[:, 16:80]  # rows 96 apart, 64 long
    w = rand(8, 64, seed=1)
    got = kernels.skinny_matmul(x, w, None, None, ISAS[best_isa(cpu_flags())][0])
    torch.testing.assert_close(got, F.linear(x, w), **TOLERANCE[torch.float32])


def test_refuses_mismatched_inputs(kernels):
    x, w = rand(2, 8), rand(4, 8, seed=1)
    with pytest.raises(RuntimeError, match="scales"):
        kernels.skinny_matmul(x, quantize_int8(w)[0], None, None, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.skinny_matmul(x, w.to(torch.bfloat16), None, None, 0)
    with pytest.raises(RuntimeError, match="instruction set"):
        kernels.skinny_matmul(x, w, None, None, 9)


def test_isa_choice_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    avx512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"})
    assert select_isa(avx512 | {"avx512_bf16"}) == "avx512"  # the bfloat16 body does int8 with VNNI too
    assert select_isa(frozenset()) == "portable"
    assert select_isa(frozenset({"avx2", "fma"})) == "avx2"
    assert select_isa(avx512) == "avx512"
    assert select_isa(avx512 | {"avx512_bf16", "avx512_vnni"}) == "avx512_bf16"
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert select_isa(avx512) == "avx2"  # forced down
    with pytest.raises(ValueError, match="lacks avx512bw, avx512f, avx512vl"):
        select_isa(frozenset({"avx2", "fma"}), forced="avx512")
    with pytest.raises(ValueError, match="choose from"):
        select_isa(avx512, forced="sse2")


def test_quantize_int8_is_symmetric_per_output_row():
    w = rand(6, 40) * torch.arange(1, 7)[:, None]  # rows of very different magnitude
    w[3] = 0
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (6,)
    assert q.abs().amax(dim=1).tolist() == [127, 127, 127, 0, 127, 127]
    assert torch.all((dequantize_int8(q, scales, torch.float32) - w).abs() <= scales[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_agrees_across_the_kernel_and_onednn(kernels, quantization, dtype):
    """Rows up to the crossover go to the kernel, more to F.linear: both compute the same layer."""
    layer = Linear(72, 40, bias=True)
    layer.weight.data, layer.bias.data = rand(40, 72, seed=3).to(dtype), rand(40, seed=4).to(dtype)
    # The kernel scales finished float32 dot products; the F.linear path widens int8 to the model dtype.
    kernel_w, onednn_w = layer.weight.float(), layer.weight.float()
    if quantization:
        q, scales = quantize_int8(layer.weight)
        kernel_w, onednn_w = dequantize_int8(q, scales, torch.float32), dequantize_int8(q, scales, dtype).float()
    layer.prepare(kernels, best_isa(cpu_flags()), quantization)
    assert isinstance(layer.skinny, SkinnyMatmul)
    assert layer.weight.dtype == (torch.int8 if quantization else dtype)  # one copy, in the kernel's format
    limit = MAX_ROWS[layer.weight.dtype]
    for rows in (1, limit, limit + 1):
        x = rand(rows, 72, seed=rows).to(dtype)
        want = F.linear(x.float(), kernel_w if rows <= limit else onednn_w, layer.bias.float()).to(dtype)
        torch.testing.assert_close(layer(x), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_rows_take_the_kernel_in_a_batch_of_any_size(kernels, quantization, dtype):
    """A step's decode rows (the first decode_rows) are the kernel's however many rows the step holds, so each
    has the bits of its plain decode alone; only the prompt rows past the limit go to oneDNN."""
    layer = Linear(72, 40, bias=True)
    layer.weight.data, layer.bias.data = rand(40, 72, seed=3).to(dtype), rand(40, seed=4).to(dtype)
    layer.prepare(kernels, best_isa(cpu_flags()), quantization)
    limit = MAX_ROWS[layer.weight.dtype]
    x = rand(3 * limit, 72, seed=5).to(dtype)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    for decode_rows in (limit + 1, 2 * limit - 1, 3 * limit):
        got = layer(x, decode_rows)
        assert torch.equal(got[:decode_rows], alone[:decode_rows]), f"{decode_rows} decode rows"
        assert torch.equal(got[decode_rows:], layer(x[decode_rows:])), f"{decode_rows} decode rows: prompt rows"


def test_int8_lm_head_leaves_a_tied_embedding_alone(kernels):
    embedding = torch.nn.Embedding(50, 16)
    head = Linear(16, 50, bias=False)
    head.weight = embedding.weight
    before = embedding.weight.detach().clone()
    head.prepare(kernels, "portable", "int8")
    assert head.weight.dtype == torch.int8 and torch.equal(embedding.weight, before)
