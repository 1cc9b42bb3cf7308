// A decode step's whole stack of decoder layers as one call, in one parallel region.
//
// Run op by op from Python, a decode token of a small model pays, per op, the dispatcher, a tensor
// allocation and an OpenMP fork/join: ~10 ops a layer, ~300 a token, about as long as streaming the
// weights. Here one thread team walks every layer, the threads splitting each op's rows (or attention
// items, or output-row blocks of a matmul) and meeting at a barrier between ops. The bodies are the
// single-op kernels' own (layer_ops.h, SkinnyMatmul), and no output is ever split between threads,
// so the numbers are exactly those of the op-by-op path, whatever the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <map>
#include <optional>
#include <string>

#include "layer_ops.h"
#include "skinny_matmul.h"
#include "team_barrier.h"

namespace {

using Weights = std::map<std::string, std::optional<torch::Tensor>>;

// A projection's tensors, held so that the kernel's raw pointers stay valid.
struct Projection {
  torch::Tensor weight, scales, bias;  // scales/bias: float32, or undefined

  Projection(const Weights& w, const std::string& name) {
    weight = w.at(name + ".weight").value();
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), name, ": contiguous [out, in] weight");
    if (auto s = w.at(name + ".scales")) scales = s->to(at::kFloat).contiguous();
    if (auto b = w.at(name + ".bias")) bias = b->to(at::kFloat).contiguous();
  }
  SkinnyWeight skinny() const {
    return {weight.data_ptr(), weight.scalar_type(), scales.defined() ? scales.data_ptr<float>() : nullptr,
            bias.defined() ? bias.data_ptr<float>() : nullptr, weight.size(0), weight.size(1)};
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm, q_norm, k_norm;  // q_norm/k_norm: Qwen3's, else undefined
  Projection qkv, o_proj, gate_up, down;

  explicit Layer(const Weights& w)
      : input_norm(w.at("input_norm").value()), post_norm(w.at("post_norm").value()),
        q_norm(w.at("q_norm").value_or(torch::Tensor())), k_norm(w.at("k_norm").value_or(torch::Tensor())),
        qkv(w, "qkv"), o_proj(w, "o_proj"), gate_up(w, "gate_up"), down(w, "down") {}
};

// This thread's share of [0, n) in one contiguous run, then the barrier that ends the op.
template <typename F>
void split(TeamBarrier& barrier, int64_t n, const F& f) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t chunk = (n + threads - 1) / threads, begin = std::min(n, me * chunk), end = std::min(n, begin + chunk);
  if (begin < end) f(begin, end);
  barrier.wait();
}

// As split, but each thread's run of [0, n) holds about an equal share of cost(i): a batch's attention
// items differ as much as its contexts do (a 512-token prompt beside a 32-token one), and an even count
// of items left one thread waiting at the barrier for the other's long requests.
template <typename C, typename F>
void split_by_cost(TeamBarrier& barrier, int64_t n, const C& cost, const F& f) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += cost(i);
  // Thread t starts at the first item whose preceding cost reaches t/threads of the total.
  int64_t begin = -1, end = n, before = 0;
  for (int64_t i = 0; i < n && end == n; ++i) {
    if (begin < 0 && before * threads >= total * me) begin = i;
    if (before * threads >= total * (me + 1)) end = i;
    before += cost(i);
  }
  if (begin >= 0 && begin < end) f(begin, end);
  barrier.wait();
}

// y = x W^T by the team: one thread stages x, then the output-row blocks are split.
void matmul(TeamBarrier& barrier, SkinnyMatmul& mm, const Projection& w, const void* x, int64_t x_stride,
            at::ScalarType dtype, void* y, int64_t rows) {
  if (omp_get_thread_num() == 0) mm.stage(w.skinny(), x, x_stride, dtype, y, rows);
  barrier.wait();  // every thread sees the staged x
  split(barrier, mm.blocks(), [&](int64_t begin, int64_t end) { mm.run_blocks(begin, end); });
}

class DecodeStack {
 public:
  DecodeStack(const std::vector<Weights>& layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              double eps, int64_t isa_code)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)),
        isa_(isa_code) {
    TORCH_CHECK(!layers.empty() && num_heads % num_kv_heads == 0 && head_dim % 2 == 0 && head_dim <= kMaxHeadDim,
                "unsupported layer shape");
    for (const auto& w : layers) layers_.emplace_back(w);
    const Layer& first = layers_.front();
    dtype_ = first.input_norm.scalar_type();
    hidden_ = first.input_norm.numel();
    intermediate_ = first.down.weight.size(1);
    TORCH_CHECK(first.qkv.weight.size(0) == (num_heads + 2 * num_kv_heads) * head_dim &&
                first.gate_up.weight.size(0) == 2 * intermediate_, "projection shapes do not match the heads");
  }

  // x: the step's embeddings [decodes, hidden], contiguous; it becomes the residual stream, in place.
  // Returns (the last layer's output, not yet added to the residual; the residual), as the op-by-op
  // layers do. cos/signed_sin: [decodes, head_dim]; kv_caches: each layer's (keys, values).
  std::tuple<torch::Tensor, torch::Tensor> forward(
      torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin,
      const std::vector<std::tuple<torch::Tensor, torch::Tensor>>& kv_caches, torch::Tensor slot_mapping,
      torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size, double scale) {
    const int64_t rows = x.size(0);
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == hidden_ && x.scalar_type() == dtype_, "x: [decodes, hidden]");
    TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.scalar_type() == dtype_ &&
                cos.size(0) == rows && cos.size(1) == head_dim_, "cos/sin: contiguous [decodes, head_dim], model dtype");
    TORCH_CHECK(kv_caches.size() == layers_.size(), "one (keys, values) pair per layer");
    for (const auto& [k, v] : kv_caches)
      TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.scalar_type() == dtype_ && k.size(1) == num_kv_heads_ &&
                  k.size(2) == head_dim_ && v.sizes() == k.sizes(), "KV caches: contiguous [slots, kv_heads, head_dim]");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == rows &&
                block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.size(0) == rows &&
                context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() && context_lens.numel() == rows,
                "int64 slot mapping, block tables and context lengths, one per decode");
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    auto h = torch::empty({rows, hidden_}, x.options());
    auto qkv = torch::empty({rows, q_size + 2 * kv_size}, x.options());
    auto attn = torch::empty({rows, q_size}, x.options());
    auto gate_up = torch::empty({rows, 2 * intermediate_}, x.options());
    auto act = torch::empty({rows, intermediate_}, x.options());
    if (rows == 0) return {h, x};
    pybind11::gil_scoped_release no_gil;
    dispatch(dtype_, [&](auto tag) {
      using T = decltype(tag);
      run<T>(ptr<T>(x), ptr<T>(h), ptr<T>(qkv), ptr<T>(attn), ptr<T>(gate_up), ptr<T>(act), rows, ptr<T>(cos),
             ptr<T>(signed_sin), kv_caches, slot_mapping.data_ptr<int64_t>(), block_tables, context_lens.data_ptr<int64_t>(),
             block_size, static_cast<float>(scale));
    });
    return {h, x};
  }

 private:
  template <typename T>
  void run(T* residual, T* h, T* qkv, T* attn, T* gate_up, T* act, int64_t rows, const T* cos, const T* sin,
           const std::vector<std::tuple<torch::Tensor, torch::Tensor>>& kv_caches, const int64_t* slots,
           const torch::Tensor& block_tables, const int64_t* context_lens, int64_t block_size, float scale) const {
    const int64_t hd = head_dim_, q_size = num_heads_ * hd, kv_size = num_kv_heads_ * hd, qkv_width = q_size + 2 * kv_size;
    const int64_t threads = at::get_num_threads();
    SkinnyMatmul mm(isa_);  // the team's, staged for one projection after another
    TeamBarrier barrier;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
      barrier.reset(omp_get_num_threads());  // the team libgomp gave, which may be smaller than asked
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& layer = layers_[l];
        const T* input_norm = ptr<T>(layer.input_norm);
        split(barrier, rows, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            if (l == 0) rms_norm_row(h + r * hidden_, residual + r * hidden_, input_norm, hidden_, eps_);
            else add_rms_norm_row(h + r * hidden_, residual + r * hidden_, input_norm, hidden_, eps_);
          }
        });
        matmul(barrier, mm, layer.qkv, h, hidden_, dtype_, qkv, rows);
        if (layer.q_norm.defined()) {  // Qwen3: RMSNorm over each query and key head, before RoPE
          const T *q_norm = ptr<T>(layer.q_norm), *k_norm = ptr<T>(layer.k_norm);
          const int64_t heads = num_heads_ + num_kv_heads_;
          split(barrier, rows * heads, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              T* head = qkv + (i / heads) * qkv_width + (i % heads) * hd;
              rms_norm_row(head, head, i % heads < num_heads_ ? q_norm : k_norm, hd, eps_);
            }
          });
        }
        T* k_cache = ptr<T>(std::get<0>(kv_caches[l]));
        T* v_cache = ptr<T>(std::get<1>(kv_caches[l]));
        split(barrier, rows, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r)
            rope_and_cache_row(qkv + r * qkv_width, cos + r * hd, sin + r * hd, k_cache + slots[r] * kv_size,
                               v_cache + slots[r] * kv_size, num_heads_, num_kv_heads_, hd);
        });
        DecodeAttention<T> attention{attn, qkv, qkv_width, k_cache, v_cache, block_tables.data_ptr<int64_t>(),
                                     context_lens, block_tables.size(1), rows, num_heads_, num_kv_heads_, hd,
                                     block_size, scale};
        attention.split_for(threads);
        split_by_cost(barrier, attention.items(), [&](int64_t item) { return attention.item_cost(item); },
                      [&](int64_t begin, int64_t end) { attention.run_items(begin, end); });
        matmul(barrier, mm, layer.o_proj, attn, q_size, dtype_, h, rows);
        const T* post_norm = ptr<T>(layer.post_norm);
        split(barrier, rows, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) add_rms_norm_row(h + r * hidden_, residual + r * hidden_, post_norm, hidden_, eps_);
        });
        matmul(barrier, mm, layer.gate_up, h, hidden_, dtype_, gate_up, rows);
        split(barrier, rows, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r)
            silu_and_mul_row(act + r * intermediate_, gate_up + r * 2 * intermediate_,
                             gate_up + r * 2 * intermediate_ + intermediate_, intermediate_);
        });
        matmul(barrier, mm, layer.down, act, intermediate_, dtype_, h, rows);
      }
    }
  }

  std::vector<Layer> layers_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  float eps_;
  int64_t isa_;
  at::ScalarType dtype_;
  int64_t hidden_, intermediate_;
};

}  // namespace

void bind_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<const std::vector<Weights>&, int64_t, int64_t, int64_t, double, int64_t>())
      .def("forward", &DecodeStack::forward);
}
