// A decoder layer's small ops, one row (or one attention work item) at a time: the bodies that both the
// single-op kernels (cpu_ops.cpp, each its own parallel loop) and the fused decode stack (decode_stack.cpp,
// one parallel region for every layer) run, so both compute exactly the same numbers.
// The arithmetic follows Hugging Face's op by op (float32 statistics, a rounding to the model dtype
// wherever PyTorch would store an intermediate), so results match the PyTorch path (sloserve/model/ops.py)
// up to float32 summation order. Built with -ffp-contract=off so no multiply-add is fused behind our back.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include "bits.h"
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// bfloat16 values are handled as their raw bits (uint16_t): plain integer and float arithmetic on them
// vectorizes, c10::BFloat16's struct and branches do not.
using BF16 = uint16_t;

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return bits_as<float>(static_cast<uint32_t>(v) << 16); }
template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline BF16 from_float<BF16>(float v) {  // round to nearest even, as PyTorch does; NaN stays NaN
  const uint32_t bits = bits_as<uint32_t>(v);
  const uint32_t rounded_bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? BF16{0x7FC0} : static_cast<BF16>(rounded_bits);
}
template <typename T> inline float rounded(float v) { return to_float(from_float<T>(v)); }

template <typename T> inline T* ptr(const torch::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// The model dtypes these kernels serve; float16 models take the PyTorch path.
template <typename F>
void dispatch(at::ScalarType dtype, const F& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(dtype == at::kBFloat16, "sloserve kernels take float32 or bfloat16, got ", dtype);
    f(BF16{});
  }
}

// e^x in plain float arithmetic that the compiler vectorizes (std::exp stays a scalar call, ~10x slower
// here): x = n ln2 + r, e^r by its degree-6 Taylor polynomial (|r| <= ln2/2, relative error < 2e-7),
// 2^n written into the exponent bits. Saturates at e^-87 and e^88 instead of 0 and inf.
// The spelling matters to gcc's vectorizer: std::floor, std::min/max and nested ternaries all stop it,
// hence the two flat clamps and rounding by adding and subtracting 1.5 * 2^23.
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : x;  // 2^n stays a normal float: n in [-126, 127]
  x = x > 88.f ? 88.f : x;
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;  // ln2 split in two: exact n*hi
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * bits_as<float>((static_cast<int32_t>(n) + 127) << 23);
}

// Per-thread scratch rows are stack arrays of this many floats.
constexpr int64_t kMaxHeadDim = 1024;

template <typename T>
inline void rms_norm_row(T* out, const T* x, const T* w, int64_t dim, float eps) {
  float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < dim; ++i) {
    float v = to_float(x[i]);
    sum_sq += v * v;
  }
  const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) out[i] = from_float<T>(to_float(w[i]) * rounded<T>(to_float(x[i]) * inv_rms));
}


// The residual stream's add and the next norm: residual += x, then x = RMSNorm(residual) * weight.
template <typename T>
inline void add_rms_norm_row(T* x, T* residual, const T* w, int64_t dim, float eps) {
  for (int64_t i = 0; i < dim; ++i) residual[i] = from_float<T>(to_float(residual[i]) + to_float(x[i]));
  rms_norm_row(x, residual, w, dim, eps);
}

template <typename T>
inline void silu_and_mul_row(T* __restrict out, const T* __restrict gate, const T* __restrict up, int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(rounded<T>(g / (1.f + fast_exp(-g))) * to_float(up[i]));
  }
}

// One token's rotary embedding of its query and key heads inside its fused q|k|v row, in place, and its
// new key and value copied to their cache slot. cos/signed_sin: the token's [head_dim] in the model dtype
// (Hugging Face's cast); signed_sin carries rotate_half's sign, so rotate_half(x) * sin = swap_halves(x) * signed_sin.
template <typename T>
inline void rope_and_cache_row(T* row, const T* c, const T* s, T* k_slot, T* v_slot, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim) {
  float x[kMaxHeadDim];
  const int64_t half = head_dim / 2, kv_row = num_kv_heads * head_dim;
  for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
    T* head = row + h * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) x[i] = to_float(head[i]);
    for (int64_t i = 0; i < head_dim; ++i) {
      const float swapped = x[i < half ? i + half : i - half];
      head[i] = from_float<T>(rounded<T>(x[i] * to_float(c[i])) + rounded<T>(swapped * to_float(s[i])));
    }
  }
  std::memcpy(k_slot, row + num_heads * head_dim, kv_row * sizeof(T));
  std::memcpy(v_slot, row + (num_heads + num_kv_heads) * head_dim, kv_row * sizeof(T));
}

// Decode attention: one query token per request attending to its whole context through its block table.
// q: [requests, heads, head_dim] (rows may be strided); caches: [slots, kv_heads, head_dim].
// A work item is a request's KV heads (all of them, or one each when there are too few requests to
// keep every thread busy): keys are then read as whole contiguous rows, block by block, which the
// hardware prefetcher streams; reading one head's 128 bytes of each row ran at a third of the speed.
// Every head's arithmetic is the same however the items are cut, so the split never changes a number.
template <typename T>
struct DecodeAttention {
  T* out;  // [requests, heads, head_dim]
  const T* q;
  int64_t q_stride;
  const T *k_cache, *v_cache;
  const int64_t *tables, *context_lens;
  int64_t table_width, requests, num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  int64_t kv_per_item = 1;

  void split_for(int64_t threads) { kv_per_item = requests >= 2 * threads ? num_kv_heads : 1; }
  int64_t items() const { return requests * (num_kv_heads / kv_per_item); }
  // An item's work, in cached tokens read (plus a fixed share for its setup): items of one request cost alike.
  int64_t item_cost(int64_t item) const { return context_lens[item / (num_kv_heads / kv_per_item)] + 16; }
  int64_t multiply_adds() const {
    int64_t total_context = 0;
    for (int64_t r = 0; r < requests; ++r) total_context += context_lens[r];
    return total_context * num_heads * head_dim;
  }
  // head_dim 64 and 128 fixed at compile time: the per-token loops over it unroll into whole vectors.
  void run_items(int64_t begin, int64_t end) const {
    if (head_dim == 64) return items_of<64>(begin, end);
    if (head_dim == 128) return items_of<128>(begin, end);
    items_of<0>(begin, end);
  }

 private:
  template <int64_t HD>
  void items_of(int64_t begin, int64_t end) const {
    const int64_t head_dim = HD > 0 ? HD : this->head_dim;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t items_per_request = num_kv_heads / kv_per_item, heads_per_item = kv_per_item * group;
    const int64_t token_stride = num_kv_heads * head_dim;  // elements from one cached token to the next
    const T *kc = k_cache, *vc = v_cache;
    std::vector<float> scores, qf(heads_per_item * head_dim);
    float row[HD > 0 ? HD : kMaxHeadDim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / items_per_request, kv0 = (item % items_per_request) * kv_per_item;
      const int64_t ctx = context_lens[r], first_head = kv0 * group;
      const int64_t* table = tables + r * table_width;
      scores.resize(heads_per_item * ctx);
      for (int64_t h = 0; h < heads_per_item; ++h) {
        const T* qh = q + r * q_stride + (first_head + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[h * head_dim + d] = to_float(qh[d]);
      }
      // Scores. Blocks outer, offsets inner: no integer division per token.
      for (int64_t b = 0, t0 = 0; t0 < ctx; ++b, t0 += block_size) {
        const int64_t base = table[b] * block_size * token_stride + kv0 * head_dim;
        for (int64_t j = 0; j < std::min(block_size, ctx - t0); ++j) {
          const T* k_row = kc + base + j * token_stride;
          // The values come next: fetch them while the keys are being worked on.
          for (int64_t off = 0; off < kv_per_item * head_dim * (int64_t)sizeof(T); off += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(vc + base + j * token_stride) + off);
          for (int64_t kh = 0; kh < kv_per_item; ++kh) {
            const T* k = k_row + kh * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(k[d]);  // converted once for the group
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = kh * group + g;
              const float* qh = qf.data() + h * head_dim;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * row[d];
              scores[h * ctx + t0 + j] = dot * scale;
            }
          }
        }
      }
      for (int64_t h = 0; h < heads_per_item; ++h) {
        float* sh = scores.data() + h * ctx;
        float peak = sh[0];
        for (int64_t t = 1; t < ctx; ++t) peak = sh[t] > peak ? sh[t] : peak;
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < ctx; ++t) {
          sh[t] = fast_exp(sh[t] - peak);
          total += sh[t];
        }
        const float inv_total = 1.f / total;
        for (int64_t t = 0; t < ctx; ++t) sh[t] *= inv_total;
      }
      // Weighted values, one query head at a time so its output row stays in registers.
      for (int64_t h = 0; h < heads_per_item; ++h) {
        const float* ph = scores.data() + h * ctx;
        const int64_t kh = h / group;
        std::fill(row, row + head_dim, 0.f);
        for (int64_t b = 0, t0 = 0; t0 < ctx; ++b, t0 += block_size) {
          const T* values = vc + table[b] * block_size * token_stride + (kv0 + kh) * head_dim;
          for (int64_t j = 0; j < std::min(block_size, ctx - t0); ++j) {
            const T* v = values + j * token_stride;
            const float p = ph[t0 + j];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) row[d] += p * to_float(v[d]);
          }
        }
        T* oh = out + (r * num_heads + first_head + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) oh[d] = from_float<T>(row[d]);
      }
    }
  }
};

}  // namespace
