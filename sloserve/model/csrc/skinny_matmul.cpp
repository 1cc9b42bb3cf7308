// y = x W^T (+ b) for the few rows of a decode or speculative-verify step: a weight-streaming kernel.
//
// With 1-16 rows of x a matmul reads every weight once and does next to no arithmetic per byte, so its
// speed is the memory's. Each output row is a dot product along a contiguous weight row (PyTorch's own
// [N, K] layout, so the prefill path's oneDNN reads the same single copy); four weight rows stream at
// once and each weight vector loaded serves up to four rows of x from registers. Threads split the
// output rows. Weights: float32, bfloat16, or int8 with one float32 scale per output row (weight-only
// quantization: the scale multiplies the finished dot product; the int8 values meet x either widened
// to float32 in registers or, with VNNI and a bfloat16 x, in byte dot products against x held as
// 16-bit fixed point, finer than bfloat16 itself: see Fixed16).
//
// One body per instruction set, chosen at run time by the caller (sloserve/model/skinny.py reads the
// CPU's flags): AVX512-BF16 (+VNNI) dot products, AVX-512, AVX2+FMA, and portable C++. Each is compiled
// with its own target attribute, so the file builds on a CPU without AVX-512 and any path can be forced.
#include "skinny_bodies.h"
#include "skinny_matmul.h"

namespace {

// ---- driver -------------------------------------------------------------------------------------
// One body, its row-block and x-tile sizes fixed at compile time (the accumulators must be registers).
template <typename W, typename X, int R, int MT>
void dots(Isa isa, const Tile<W, X>& t, Sums out) {
  if constexpr (std::is_same_v<X, BF16>) {
    dots_avx512bf16<R, MT>(t, out);  // x stays bfloat16 only for the dot-product instruction
  } else if constexpr (std::is_same_v<X, Fixed16>) {
    dots_vnni<R, MT>(t, out);
  } else if (isa == kAvx512 || isa == kAvx512Bf16) {
    dots_avx512<R, MT>(t, out);
  } else if (isa == kAvx2) {
    dots_avx2<R, MT>(t, out);
  } else {
    dots_portable<R, MT>(t, out);
  }
}

template <typename W, typename X, int R>
void dots_tile(Isa isa, int tile, const Tile<W, X>& t, Sums out) {
  switch (tile) {
    case 1: return dots<W, X, R, 1>(isa, t, out);
    case 2: return dots<W, X, R, 2>(isa, t, out);
    case 3: return dots<W, X, R, 3>(isa, t, out);
    case 4: return dots<W, X, R, 4>(isa, t, out);
  }
  if constexpr (tile_width<X>() == 6) {
    if (tile == 5) return dots<W, X, R, 5>(isa, t, out);
    return dots<W, X, R, 6>(isa, t, out);
  }
}

}  // namespace

// One chunk of output-row blocks, the body and tile sizes fixed at compile time.
template <typename W, typename X, typename Y>
void run_blocks_of(const SkinnyMatmul& mm, int64_t begin, int64_t end) {
  const Isa isa = static_cast<Isa>(mm.isa_);
  const int64_t n = mm.weight_.n, k = mm.weight_.k, m_rows = mm.m_, x_stride = mm.x_stride_;
  const W* w = static_cast<const W*>(mm.weight_.data);
  const X* x = static_cast<const X*>(mm.x_);
  Y* y = static_cast<Y*>(mm.y_);
  const float *scales = mm.weight_.scales, *bias = mm.weight_.bias, *x_scales = mm.x_scales_;
  const int64_t prefetch = prefetch_offset(k, sizeof(W));
  constexpr int width = tile_width<X>();
  float sums[kMaxTile][kRowBlock];
  for (int64_t b = begin; b < end; ++b) {
    const int64_t row = b * kRowBlock, rows = std::min<int64_t>(kRowBlock, n - row);
    for (int64_t m0 = 0; m0 < m_rows; m0 += width) {
      const int tile = static_cast<int>(std::min<int64_t>(width, m_rows - m0));
      for (int64_t r0 = 0; r0 < rows;) {  // a full block of rows, else the ragged rows one at a time
        const Tile<W, X> t{w + (row + r0) * k, x + m0 * x_stride, k, x_stride, x_scales ? x_scales + m0 : nullptr,
                           prefetch};
        const int step = rows - r0 == kRowBlock ? kRowBlock : 1;
        if (step == kRowBlock) dots_tile<W, X, kRowBlock>(isa, tile, t, sums);
        else dots_tile<W, X, 1>(isa, tile, t, sums);
        for (int r = 0; r < step; ++r) {
          const int64_t col = row + r0 + r;
          for (int m = 0; m < tile; ++m) {
            float v = sums[m][r];
            if (scales) v *= scales[col];
            if (bias) v += bias[col];
            Y* dst = y + (m0 + m) * n + col;
            if constexpr (std::is_same_v<Y, BF16>) *dst = float_to_bf16(v);
            else *dst = v;
          }
        }
        r0 += step;
      }
    }
  }
}

int64_t SkinnyMatmul::blocks() const { return (weight_.n + kRowBlock - 1) / kRowBlock; }

int64_t SkinnyMatmul::grain() const {
  return std::max<int64_t>(1, 65536 / (kRowBlock * weight_.k * int64_t(c10::elementSize(weight_.dtype))));
}

namespace {

// The body for weight W and output Y, reading x as X.
template <typename W, typename Y>
auto body_for(bool bf16_dots, bool fixed16) -> void (*)(const SkinnyMatmul&, int64_t, int64_t) {
  if constexpr (std::is_same_v<W, BF16>) {
    if (bf16_dots) return run_blocks_of<W, BF16, Y>;
  }
  if constexpr (std::is_same_v<W, int8_t>) {
    if (fixed16) return run_blocks_of<W, Fixed16, Y>;
  }
  return run_blocks_of<W, float, Y>;
}

template <typename W>
auto body_for(bool bf16_out, bool bf16_dots, bool fixed16) {
  return bf16_out ? body_for<W, BF16>(bf16_dots, fixed16) : body_for<W, float>(bf16_dots, fixed16);
}

}  // namespace

void SkinnyMatmul::stage(const SkinnyWeight& weight, const void* x, int64_t x_stride, at::ScalarType x_dtype, void* y,
                         int64_t m) {
  weight_ = weight;
  const int64_t k = weight_.k;
  const bool bf16_x = x_dtype == at::kBFloat16, best = isa_ == kAvx512Bf16;
  const bool bf16_dots = best && bf16_x && weight_.dtype == at::kBFloat16;
  const bool fixed16 = best && bf16_x && weight_.dtype == at::kChar && k < kMaxFixed16Row;
  y_ = y;
  m_ = m;
  x_scales_ = nullptr;
  if (bf16_dots) {  // x stays bfloat16 only for the dot-product instruction
    x_ = x;
    x_stride_ = x_stride;
  } else if (fixed16) {
    staged_.resize(2 * m * k);
    staged_scales_.resize(m);
    to_fixed16(static_cast<const BF16*>(x), x_stride, m, k, reinterpret_cast<Fixed16*>(staged_.data()),
               staged_scales_.data());
    x_ = staged_.data();
    x_stride_ = 2 * k;
    x_scales_ = staged_scales_.data();
  } else if (bf16_x) {  // the other bodies multiply in float32: x widens once here, not once per weight row
    staged_.resize(m * k * sizeof(float));
    float* xf = reinterpret_cast<float*>(staged_.data());
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) xf[r * k + i] = bf16_to_float(static_cast<const BF16*>(x)[r * x_stride + i]);
    x_ = xf;
    x_stride_ = k;
  } else {
    x_ = x;
    x_stride_ = x_stride;
  }
  if (weight_.dtype == at::kChar) body_ = body_for<int8_t>(bf16_x, bf16_dots, fixed16);
  else if (weight_.dtype == at::kBFloat16) body_ = body_for<BF16>(bf16_x, bf16_dots, fixed16);
  else body_ = body_for<float>(bf16_x, bf16_dots, fixed16);
}

// x [M, K] float32/bfloat16 with contiguous rows; weight [N, K] contiguous, float32/bfloat16/int8;
// scales [N] float32 for int8 weights (else None); bias [N] in x's dtype or None. Returns [M, N] in x's dtype.
torch::Tensor skinny_matmul(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scales,
                            std::optional<torch::Tensor> bias, int64_t isa_code) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with contiguous rows");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1), "weight: contiguous [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(isa_code >= kPortable && isa_code <= kAvx512Bf16, "unknown instruction set code ", isa_code);
  const bool quantized = weight.scalar_type() == at::kChar;
  TORCH_CHECK(quantized || weight.scalar_type() == x.scalar_type(), "weight: x's dtype, or int8 with scales");
  TORCH_CHECK(quantized == scales.has_value(), "int8 weights take per-row scales, others none");
  const int64_t n = weight.size(0);
  torch::Tensor scale_f, bias_f;
  if (quantized) {
    scale_f = scales->to(at::kFloat).contiguous();
    TORCH_CHECK(scale_f.numel() == n, "one scale per output row");
  }
  if (bias) {
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == n, "one bias per output row");
  }
  auto y = torch::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0 || n == 0) return y;
  const SkinnyWeight w{weight.data_ptr(), weight.scalar_type(), quantized ? scale_f.data_ptr<float>() : nullptr,
                       bias ? bias_f.data_ptr<float>() : nullptr, n, weight.size(1)};
  SkinnyMatmul mm(isa_code);
  mm.stage(w, x.data_ptr(), x.stride(0), x.scalar_type(), y.data_ptr(), x.size(0));
  at::parallel_for(0, mm.blocks(), mm.grain(), [&](int64_t begin, int64_t end) { mm.run_blocks(begin, end); });
  return y;
}
