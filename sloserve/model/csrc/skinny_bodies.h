// The per-instruction-set bodies of skinny_matmul.cpp: dot products of a block of weight rows with a
// tile of x rows, each compiled for its own target so that any of them can run (or be forced).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include "bits.h"
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kRowBlock = 4;  // weight rows streamed together
// Rows of x sharing each loaded weight vector. The bfloat16 dot-product body holds 4 x 6 accumulators,
// 6 x vectors and the weight vector being used: 31 of the 32 zmm registers. The wider tile is for
// batches of 16-64 decodes, where the kernel is no longer memory-bound: each weight vector loaded then
// does 6 dot products instead of 4. The other bodies stay at 4 (their widening needs registers too).
constexpr int kMaxTile = 6;
// A body writes its dot products as out[x row][weight row].
using Sums = float (*)[kRowBlock];

using BF16 = uint16_t;  // raw bits, as in cpu_ops.cpp
template <typename X>
constexpr int tile_width() { return std::is_same_v<X, BF16> ? 6 : 4; }
inline float bf16_to_float(BF16 v) { return bits_as<float>(static_cast<uint32_t>(v) << 16); }
inline BF16 float_to_bf16(float v) {  // round to nearest even, as PyTorch does; NaN stays NaN
  const uint32_t bits = bits_as<uint32_t>(v);
  return v != v ? BF16{0x7FC0} : static_cast<BF16>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// What one (block of rows, tile of x rows) call needs: pointers already offset to its first row.
template <typename W, typename X>
struct Tile {
  const W* w;        // first weight row; rows are k apart
  const X* x;        // first x row; rows are x_stride apart
  int64_t k, x_stride;
  const float* x_scales = nullptr;  // Fixed16 rows only: each row's scale
  int64_t prefetch = 0;             // bytes from this block to the one to prefetch (prefetch_offset)
};

// An x row as 16-bit fixed point for integer dot products with int8 weights: x ~= scale * q with
// |q| <= 32767, stored as the two bytes of u = q + 32768 (high bytes, then low bytes, k each), so
// that sum(w q) = 256 (sum(w hi) - 128 sum(w)) + sum(w lo), every term an unsigned x signed byte
// product that VNNI sums exactly. Only a bfloat16 x takes this path: its own rounding (8 bits) is
// coarser than this one (15 bits of the row's largest value), so the dot product loses nothing that
// bfloat16 had.
struct Fixed16 {
  uint8_t byte;
};
// Rows up to this long keep every integer sum of the VNNI body exact in int32 (k * 255 * 127 < 2^31).
constexpr int64_t kMaxFixed16Row = 1 << 16;

// ---- portable C++: also the reference for the vector bodies' control flow ----------------------
inline float widen(float v) { return v; }
inline float widen(BF16 v) { return bf16_to_float(v); }
inline float widen(int8_t v) { return static_cast<float>(v); }

template <int R, int MT, typename W>
void dots_portable(const Tile<W, float>& t, Sums out) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float sum = 0.f;
      for (int64_t i = 0; i < t.k; ++i) sum += widen(t.w[r * t.k + i]) * t.x[m * t.x_stride + i];
      out[m][r] = sum;
    }
}

// The vector bodies below keep R x MT accumulators in registers: every loop over them is fully
// unrolled (a loop left rolled makes gcc keep the array in memory and store it every step).
#define UNROLL _Pragma("GCC unroll 16")

// A weight row is only a few cache lines long: too short for the hardware prefetcher to get going on
// each new row. So while a block of R rows is read, V elements per row per step, the same share of a
// block ~kAheadBytes further on is prefetched (the rows of a thread's blocks are contiguous). Measured
// on SmolLM2-135M's shapes (AMD EPYC, 2 threads): 27-29 -> 40-47 GB/s in bfloat16, 20 -> 41 in int8.
constexpr int64_t kAheadBytes = 12 << 10;
inline int64_t prefetch_offset(int64_t k, int64_t elem_size) {  // whole blocks, at least one
  const int64_t block = kRowBlock * k * elem_size;
  return (kAheadBytes + block - 1) / block * block;
}
template <int R, int V, typename W>
inline void prefetch_ahead(const W* w, int64_t k, int64_t i, int64_t offset) {
  if constexpr (R == kRowBlock) {
    const char* next = reinterpret_cast<const char*>(w) + offset + R * i * int64_t(sizeof(W));
    UNROLL for (int line = 0; line < R * V * int(sizeof(W)) / 64; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
  }
}

// ---- AVX2 + FMA: 8 lanes; the K tail (< 8) is finished in scalar code --------------------------
#define AVX2_TARGET __attribute__((target("avx2,fma"), always_inline)) inline
AVX2_TARGET __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2_TARGET __m256 load8(const BF16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
AVX2_TARGET __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
AVX2_TARGET float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int R, int MT, typename W>
__attribute__((target("avx2,fma"))) void dots_avx2(const Tile<W, float>& t, Sums out) {
  __m256 acc[R * MT];
  UNROLL for (int i = 0; i < R * MT; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t body = t.k / 8 * 8;
  for (int64_t i = 0; i < body; i += 8) {
    prefetch_ahead<R, 8>(t.w, t.k, i, t.prefetch);
    __m256 xv[MT];
    UNROLL for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(t.x + m * t.x_stride + i);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m256 wv = load8(t.w + r * t.k + i);
      UNROLL for (int m = 0; m < MT; ++m) acc[r * MT + m] = _mm256_fmadd_ps(wv, xv[m], acc[r * MT + m]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int m = 0; m < MT; ++m) {
      float sum = hsum8(acc[r * MT + m]);
      for (int64_t i = body; i < t.k; ++i) sum += widen(t.w[r * t.k + i]) * t.x[m * t.x_stride + i];
      out[m][r] = sum;
    }
  }
}

// ---- AVX-512: 16 lanes; the K tail is one masked step (zeros add nothing) ------------------------
#define AVX512_ISA "avx512f,avx512bw,avx512vl"
#define AVX512_TARGET __attribute__((target(AVX512_ISA), always_inline)) inline
AVX512_TARGET __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
AVX512_TARGET __m512 load16(const BF16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
AVX512_TARGET __m512 load16(const int8_t* p, __mmask16 k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

// The sums of R x MT accumulators into out. Four at once (one x row, the block's four weight rows):
// halves added, then three horizontal adds give the four sums in one vector, ~3 instructions per
// accumulator instead of the ~9 of a reduction each. With 16-64 rows of x and weight rows of 576
// (18 vector steps), single reductions were a third as many instructions as the dot products.
AVX512_TARGET __m256 halves(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
template <int R, int MT>
AVX512_TARGET void reduce_into(const __m512* acc, Sums out) {
  UNROLL for (int m = 0; m < MT; ++m) {
    if constexpr (R == 4) {
      const __m256 ab = _mm256_hadd_ps(halves(acc[0 * MT + m]), halves(acc[1 * MT + m]));
      const __m256 cd = _mm256_hadd_ps(halves(acc[2 * MT + m]), halves(acc[3 * MT + m]));
      const __m256 abcd = _mm256_hadd_ps(ab, cd);  // [a b c d] of the low half, then of the high half
      _mm_storeu_ps(out[m], _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    } else {
      UNROLL for (int r = 0; r < R; ++r) out[m][r] = _mm512_reduce_add_ps(acc[r * MT + m]);
    }
  }
}

template <int R, int MT, typename W>
AVX512_TARGET void step16(const Tile<W, float>& t, int64_t i, __mmask16 mask, __m512* acc) {
  __m512 xv[MT];
  UNROLL for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, t.x + m * t.x_stride + i);
  UNROLL for (int r = 0; r < R; ++r) {
    const __m512 wv = load16(t.w + r * t.k + i, mask);
    UNROLL for (int m = 0; m < MT; ++m) acc[r * MT + m] = _mm512_fmadd_ps(wv, xv[m], acc[r * MT + m]);
  }
}

template <int R, int MT, typename W>
__attribute__((target(AVX512_ISA))) void dots_avx512(const Tile<W, float>& t, Sums out) {
  __m512 acc[R * MT];
  UNROLL for (int i = 0; i < R * MT; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t body = t.k / 16 * 16;
  for (int64_t i = 0; i < body; i += 16) {
    prefetch_ahead<R, 16>(t.w, t.k, i, t.prefetch);
    step16<R, MT>(t, i, __mmask16(0xFFFF), acc);
  }
  if (body < t.k) step16<R, MT>(t, body, __mmask16((1u << (t.k - body)) - 1), acc);
  reduce_into<R, MT>(acc, out);
}

// ---- AVX512-BF16: bfloat16 weights times bfloat16 x, 32 products per instruction -----------------
#define BF16_ISA "avx512f,avx512bw,avx512vl,avx512bf16"
template <int R, int MT>
__attribute__((target(BF16_ISA), always_inline)) inline void step32(const Tile<BF16, BF16>& t, int64_t i,
                                                                     __mmask32 mask, __m512* acc) {
  __m512bh xv[MT];
  UNROLL for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, t.x + m * t.x_stride + i);
  UNROLL for (int r = 0; r < R; ++r) {
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, t.w + r * t.k + i);
    UNROLL for (int m = 0; m < MT; ++m) acc[r * MT + m] = _mm512_dpbf16_ps(acc[r * MT + m], xv[m], wv);
  }
}

template <int R, int MT>
__attribute__((target(BF16_ISA))) void dots_avx512bf16(const Tile<BF16, BF16>& t, Sums out) {
  __m512 acc[R * MT];
  UNROLL for (int i = 0; i < R * MT; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t body = t.k / 32 * 32;
  for (int64_t i = 0; i < body; i += 32) {
    prefetch_ahead<R, 32>(t.w, t.k, i, t.prefetch);
    step32<R, MT>(t, i, __mmask32(0xFFFFFFFFu), acc);
  }
  if (body < t.k) step32<R, MT>(t, body, __mmask32((1u << (t.k - body)) - 1), acc);
  reduce_into<R, MT>(acc, out);
}

// ---- AVX512-VNNI: int8 weights times Fixed16 x, 64 byte products per instruction ------------------
#define VNNI_ISA "avx512f,avx512bw,avx512vl,avx512vnni"
template <int R, int MT>
__attribute__((target(VNNI_ISA), always_inline)) inline void step64(const Tile<int8_t, Fixed16>& t, int64_t i,
                                                                     __mmask64 mask, __m512i* hi, __m512i* lo,
                                                                     __m512i* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t* x = reinterpret_cast<const uint8_t*>(t.x);
  __m512i xh[MT], xl[MT];
  UNROLL for (int m = 0; m < MT; ++m) {
    xh[m] = _mm512_maskz_loadu_epi8(mask, x + m * t.x_stride + i);
    xl[m] = _mm512_maskz_loadu_epi8(mask, x + m * t.x_stride + t.k + i);
  }
  UNROLL for (int r = 0; r < R; ++r) {
    const __m512i wv = _mm512_maskz_loadu_epi8(mask, t.w + r * t.k + i);
    sums[r] = _mm512_dpbusd_epi32(sums[r], ones, wv);
    UNROLL for (int m = 0; m < MT; ++m) {
      hi[r * MT + m] = _mm512_dpbusd_epi32(hi[r * MT + m], xh[m], wv);
      lo[r * MT + m] = _mm512_dpbusd_epi32(lo[r * MT + m], xl[m], wv);
    }
  }
}

template <int R, int MT>
__attribute__((target(VNNI_ISA))) void dots_vnni(const Tile<int8_t, Fixed16>& t, Sums out) {
  if constexpr (MT > 2) {  // registers hold two rows of x at a time: 2 x R x 2 accumulators, R row sums
    dots_vnni<R, 2>(t, out);
    const Tile<int8_t, Fixed16> t2{t.w, t.x + 2 * t.x_stride, t.k, t.x_stride, t.x_scales + 2, t.prefetch};
    dots_vnni<R, MT - 2>(t2, out + 2);
  } else {
    __m512i hi[R * MT], lo[R * MT], sums[R];
    UNROLL for (int i = 0; i < R * MT; ++i) hi[i] = lo[i] = _mm512_setzero_si512();
    UNROLL for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_si512();
    const int64_t body = t.k / 64 * 64;
    for (int64_t i = 0; i < body; i += 64) {
      prefetch_ahead<R, 64>(t.w, t.k, i, t.prefetch);
      step64<R, MT>(t, i, ~__mmask64(0), hi, lo, sums);
    }
    if (body < t.k) step64<R, MT>(t, body, (__mmask64(1) << (t.k - body)) - 1, hi, lo, sums);
    UNROLL for (int r = 0; r < R; ++r) {
      // The sums fit int32 (k < kMaxFixed16Row); their combination needs int64.
      const int64_t sum_w = _mm512_reduce_add_epi32(sums[r]);
      UNROLL for (int m = 0; m < MT; ++m) {
        const int64_t h = _mm512_reduce_add_epi32(hi[r * MT + m]), l = _mm512_reduce_add_epi32(lo[r * MT + m]);
        out[m][r] = static_cast<float>(256 * (h - 128 * sum_w) + l) * t.x_scales[m];
      }
    }
  }
}

// Rows of a bfloat16 x as Fixed16: [m][high bytes of k, low bytes of k], and each row's scale.
void to_fixed16(const BF16* x, int64_t x_stride, int64_t m_rows, int64_t k, Fixed16* out, float* row_scales) {
  for (int64_t m = 0; m < m_rows; ++m) {
    const BF16* row = x + m * x_stride;
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::abs(bf16_to_float(row[i])));
    const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
    row_scales[m] = scale;
    uint8_t* hi = reinterpret_cast<uint8_t*>(out + m * 2 * k);
    uint8_t* lo = hi + k;
    for (int64_t i = 0; i < k; ++i) {
      const float q = std::clamp(std::nearbyint(bf16_to_float(row[i]) * inv), -32767.f, 32767.f);
      const uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(q) + 32768);
      hi[i] = static_cast<uint8_t>(u >> 8);
      lo[i] = static_cast<uint8_t>(u & 0xFFu);
    }
  }
}

}  // namespace
