// Fused CPU kernels for the small ops of a decoder layer; sloserve/model/kernels.py builds and loads them.
//
// On a CPU a small model's decode step is dominated by per-op overhead, not arithmetic: each kernel here
// replaces a chain of 3-10 PyTorch ops, and decode attention reads keys and values through the block
// table in place instead of gathering them into a padded copy every layer. The row bodies are in
// layer_ops.h; each op here is one parallel loop over them. (Decode steps run the whole layer stack as
// one call instead: decode_stack.cpp.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "layer_ops.h"

namespace {

// Rows per parallel chunk so that a chunk has ~16k elements of work: a decode step's single row stays
// on the calling thread, where waking the pool would cost more than the work.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

void check_weight(const torch::Tensor& weight, const torch::Tensor& x) {
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "norm weight: contiguous, one per column, in the dtype of x");
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
      for (int64_t r = begin; r < end; ++r) add_rms_norm_row(xp + r * dim, rp + r * dim, wp, dim, static_cast<float>(eps));
    });
  });
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
// values written to their cache slots (rope_and_cache_row, one token per row).
void rope_and_cache_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor signed_sin, torch::Tensor k_cache,
                     torch::Tensor v_cache, torch::Tensor slot_mapping, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.scalar_type() == qkv.scalar_type(), "cos/sin: contiguous, model dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "int64 slot mapping");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "unsupported head_dim");
  const int64_t tokens = qkv.size(0), stride = qkv.stride(0);
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
      for (int64_t t = begin; t < end; ++t)
        rope_and_cache_row(base + t * stride, cos_p + t * head_dim, sin_p + t * head_dim, kc + slots[t] * kv_row,
                           vc + slots[t] * kv_row, num_heads, num_kv_heads, head_dim);
    });
  });
}

// q: [requests, heads, head_dim] (rows may be strided); caches: [slots, kv_heads, head_dim].
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
    DecodeAttention<scalar_t> attention{ptr<scalar_t>(out), ptr<scalar_t>(q), q.stride(0), ptr<scalar_t>(k_cache),
                                        ptr<scalar_t>(v_cache), block_tables.data_ptr<int64_t>(),
                                        context_lens.data_ptr<int64_t>(), block_tables.size(1), requests, num_heads,
                                        num_kv_heads, head_dim, block_size, static_cast<float>(scale)};
    attention.split_for(at::get_num_threads());
    // A short step runs on the calling thread: waking the pool costs more than ~64k multiply-adds.
    const int64_t items = attention.items();
    at::parallel_for(0, items, attention.multiply_adds() < 65536 ? items : 1,
                     [&](int64_t begin, int64_t end) { attention.run_items(begin, end); });
  });
  return out;
}

}  // namespace

// skinny_matmul.cpp: the decode-sized matmul.
torch::Tensor skinny_matmul(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scales,
                            std::optional<torch::Tensor> bias, int64_t isa_code);
// decode_stack.cpp: a decode step's whole layer stack in one call.
void bind_decode_stack(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm_", &add_rms_norm_);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("rope_and_cache_", &rope_and_cache_);
  m.def("decode_attention", &decode_attention);
  m.def("skinny_matmul", &skinny_matmul);
  bind_decode_stack(m);
}
