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

template <typename W, typename X, typename Y>
void run(Isa isa, const W* w, const float* scales, const float* bias, const X* x, int64_t x_stride, Y* y,
         int64_t m_rows, int64_t n, int64_t k, const float* x_scales = nullptr) {
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  // ~64 KiB of weights per chunk at least: a small matrix stays on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (kRowBlock * k * int64_t(sizeof(W))));
  const int64_t prefetch = prefetch_offset(k, sizeof(W));
  constexpr int width = tile_width<X>();
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
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
  });
}

template <typename W, typename Y>
void run_on(Isa isa, const torch::Tensor& w, const float* scales, const float* bias, const torch::Tensor& x,
            torch::Tensor& y) {
  const int64_t m = x.size(0), n = w.size(0), k = w.size(1);
  const W* wp = static_cast<const W*>(w.data_ptr());
  Y* yp = static_cast<Y*>(y.data_ptr());
  if constexpr (std::is_same_v<W, BF16>) {
    if (isa == kAvx512Bf16 && x.scalar_type() == at::kBFloat16)
      return run(isa, wp, scales, bias, static_cast<const BF16*>(x.data_ptr()), x.stride(0), yp, m, n, k);
  }
  if constexpr (std::is_same_v<W, int8_t>) {
    if (isa == kAvx512Bf16 && x.scalar_type() == at::kBFloat16 && k < kMaxFixed16Row) {
      std::vector<Fixed16> fixed(2 * m * k);
      std::vector<float> x_scales(m);
      to_fixed16(static_cast<const BF16*>(x.data_ptr()), x.stride(0), m, k, fixed.data(), x_scales.data());
      return run(isa, wp, scales, bias, fixed.data(), 2 * k, yp, m, n, k, x_scales.data());
    }
  }
  // The other bodies multiply in float32: a bfloat16 x widens once here, not once per weight row.
  const torch::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  run(isa, wp, scales, bias, static_cast<const float*>(xf.data_ptr()), xf.stride(0), yp, m, n, k);
}

}  // namespace

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
  const Isa isa = static_cast<Isa>(isa_code);
  const float* sp = quantized ? scale_f.data_ptr<float>() : nullptr;
  const float* bp = bias ? bias_f.data_ptr<float>() : nullptr;
  const bool bf16_out = x.scalar_type() == at::kBFloat16;
  auto go = [&](auto w_tag) {
    using W = decltype(w_tag);
    if (bf16_out) run_on<W, BF16>(isa, weight, sp, bp, x, y);
    else run_on<W, float>(isa, weight, sp, bp, x, y);
  };
  if (quantized) go(int8_t{});
  else if (weight.scalar_type() == at::kBFloat16) go(BF16{});
  else go(float{});
  return y;
}
