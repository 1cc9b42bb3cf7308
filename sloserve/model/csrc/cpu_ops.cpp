// Fused CPU kernels for the small ops of a decoder layer; sloserve/model/kernels.py builds and loads them.
//
// On a CPU a small model's decode step is dominated by per-op overhead, not arithmetic: each kernel here
// replaces a chain of 3-10 PyTorch ops, and decode attention reads keys and values through the block
// table in place instead of gathering them into a padded copy every layer.
// The arithmetic follows Hugging Face's op by op (float32 statistics, a rounding to the model dtype
// wherever PyTorch would store an intermediate), so results match the PyTorch path (sloserve/model/ops.py)
// up to float32 summation order. Built with -ffp-contract=off so no multiply-add is fused behind our back.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include "bits.h"
#include <cmath>
#include <cstring>
#include <limits>
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

// Rows per parallel chunk so that a chunk has ~16k elements of work: a decode step's single row stays
// on the calling thread, where waking the pool would cost more than the work.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

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

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

void check_weight(const torch::Tensor& weight, const torch::Tensor& x) {
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "norm weight: contiguous, one per column, in the dtype of x");
}

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

// out = RMSNorm(x) * weight.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t rows = x.size(0), dim = x.size(1), stride = x.stride(0);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = ptr<scalar_t>(x);
    const scalar_t* wp = ptr<scalar_t>(weight);
    scalar_t* op = ptr<scalar_t>(out);
    at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(op + r * dim, xp + r * stride, wp, dim, static_cast<float>(eps));
    });
  });
  return out;
}

// The residual stream's add and the next norm in one pass: residual += x, then x = RMSNorm(residual) * weight.
void add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes() &&
              residual.scalar_type() == x.scalar_type(), "x, residual: same shape and dtype, contiguous");
  const int64_t rows = x.size(0), dim = x.size(1);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = ptr<scalar_t>(x);
    scalar_t* rp = ptr<scalar_t>(residual);
    const scalar_t* wp = ptr<scalar_t>(weight);
    at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xr = xp + r * dim;
        scalar_t* res = rp + r * dim;
        for (int64_t i = 0; i < dim; ++i) res[i] = from_float<scalar_t>(to_float(res[i]) + to_float(xr[i]));
        rms_norm_row(xr, res, wp, dim, static_cast<float>(eps));
      }
    });
  });
}

template <typename T>
inline void silu_and_mul_row(T* __restrict out, const T* __restrict gate, const T* __restrict up, int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(rounded<T>(g / (1.f + fast_exp(-g))) * to_float(up[i]));
  }
}

// silu(gate) * up for x = [gate | up], Hugging Face's two roundings included.
torch::Tensor silu_and_mul(torch::Tensor x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), width = x.size(1) / 2, stride = x.stride(0);
  auto out = torch::empty({rows, width}, x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = ptr<scalar_t>(x);
    scalar_t* op = ptr<scalar_t>(out);
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(op + r * width, xp + r * stride, xp + r * stride + width, width);
    });
  });
  return out;
}

// Rotary embedding of the query and key heads of a fused q|k|v matrix, in place, and the new keys and
// values written to their cache slots. cos/signed_sin: [tokens, head_dim] in the model dtype (Hugging
// Face's cast); signed_sin carries rotate_half's sign, so rotate_half(x) * sin = swap_halves(x) * signed_sin.
void rope_and_cache_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor signed_sin, torch::Tensor k_cache,
                     torch::Tensor v_cache, torch::Tensor slot_mapping, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.scalar_type() == qkv.scalar_type(), "cos/sin: contiguous, model dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "int64 slot mapping");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "unsupported head_dim");
  const int64_t tokens = qkv.size(0), stride = qkv.stride(0), half = head_dim / 2;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t kv_row = num_kv_heads * head_dim;
  dispatch(qkv.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* base = ptr<scalar_t>(qkv);
    const scalar_t* cos_p = ptr<scalar_t>(cos);
    const scalar_t* sin_p = ptr<scalar_t>(signed_sin);
    scalar_t* kc = ptr<scalar_t>(k_cache);
    scalar_t* vc = ptr<scalar_t>(v_cache);
    at::parallel_for(0, tokens, grain_rows((num_heads + 2 * num_kv_heads) * head_dim), [&](int64_t begin, int64_t end) {
      float x[kMaxHeadDim];
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_p + t * head_dim;
        const scalar_t* s = sin_p + t * head_dim;
        scalar_t* row = base + t * stride;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
          scalar_t* head = row + h * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) x[i] = to_float(head[i]);
          for (int64_t i = 0; i < head_dim; ++i) {
            const float swapped = x[i < half ? i + half : i - half];
            head[i] = from_float<scalar_t>(rounded<scalar_t>(x[i] * to_float(c[i])) +
                                           rounded<scalar_t>(swapped * to_float(s[i])));
          }
        }
        std::memcpy(kc + slots[t] * kv_row, row + num_heads * head_dim, kv_row * sizeof(scalar_t));
        std::memcpy(vc + slots[t] * kv_row, row + (num_heads + num_kv_heads) * head_dim, kv_row * sizeof(scalar_t));
      }
    });
  });
}

// One query token per request attending to its whole context through its block table.
// q: [requests, heads, head_dim] (rows may be strided); caches: [slots, kv_heads, head_dim].
// A work item is a request's KV heads (all of them, or one each when there are too few requests to
// keep every thread busy): keys are then read as whole contiguous rows, block by block, which the
// hardware prefetcher streams; reading one head's 128 bytes of each row ran at a third of the speed.
// HD > 0 fixes head_dim at compile time, so the per-token loops over it unroll into whole vectors.
template <typename T, int64_t HD>
void decode_attention_kernel(T* out, const T* q, int64_t q_stride, const T* kc, const T* vc, const int64_t* tables,
                             int64_t table_width, const int64_t* context_lens, int64_t requests, int64_t num_heads,
                             int64_t num_kv_heads, int64_t runtime_head_dim, int64_t block_size, float scale) {
  const int64_t head_dim = HD > 0 ? HD : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t kv_per_item = requests >= 2 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t items_per_request = num_kv_heads / kv_per_item, heads_per_item = kv_per_item * group;
  const int64_t token_stride = num_kv_heads * head_dim;  // elements from one cached token to the next
  int64_t total_context = 0;
  for (int64_t r = 0; r < requests; ++r) total_context += context_lens[r];
  // A short step runs on the calling thread: waking the pool costs more than ~64k multiply-adds.
  const int64_t items = requests * items_per_request;
  const int64_t grain = total_context * num_heads * head_dim < 65536 ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
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
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                               torch::Tensor context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: [requests, heads, head_dim], heads packed");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous(), "contiguous caches and tables");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables and lengths");
  const int64_t requests = q.size(0), num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(head_dim <= kMaxHeadDim, "unsupported head_dim");
  auto out = torch::empty({requests, num_heads, head_dim}, q.options());
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = head_dim == 64    ? decode_attention_kernel<scalar_t, 64>
                  : head_dim == 128 ? decode_attention_kernel<scalar_t, 128>
                                    : decode_attention_kernel<scalar_t, 0>;
    kernel(ptr<scalar_t>(out), ptr<scalar_t>(q), q.stride(0), ptr<scalar_t>(k_cache),
           ptr<scalar_t>(v_cache), block_tables.data_ptr<int64_t>(), block_tables.size(1),
           context_lens.data_ptr<int64_t>(), requests, num_heads, num_kv_heads, head_dim, block_size,
           static_cast<float>(scale));
  });
  return out;
}

}  // namespace

// skinny_matmul.cpp: the decode-sized matmul.
torch::Tensor skinny_matmul(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scales,
                            std::optional<torch::Tensor> bias, int64_t isa_code);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm_", &add_rms_norm_);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("rope_and_cache_", &rope_and_cache_);
  m.def("decode_attention", &decode_attention);
  m.def("skinny_matmul", &skinny_matmul);
}
