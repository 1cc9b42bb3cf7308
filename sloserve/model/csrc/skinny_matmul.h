// The decode-sized matmul as a plan that any thread team can run: skinny_matmul.cpp's torch op runs it
// in its own parallel loop, the fused decode stack (decode_stack.cpp) inside its one parallel region.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// One weight as the kernel reads it: [n, k] contiguous, float32/bfloat16/int8; int8 with one float32
// scale per output row. The bias (or null) is float32.
struct SkinnyWeight {
  const void* data;
  at::ScalarType dtype;
  const float* scales;
  const float* bias;
  int64_t n, k;
};

// y = x W^T (+ b) for a few rows of x: stage() takes the weight and puts x into the form the chosen body
// reads (bfloat16 as is, widened to float32, or 16-bit fixed point for VNNI), then blocks of output rows
// run on any thread, in any order, with the same result: each output is one body's dot product, never
// split. One SkinnyMatmul serves matmul after matmul (its staging buffers are then allocated once).
class SkinnyMatmul {
 public:
  explicit SkinnyMatmul(int64_t isa_code) : isa_(isa_code) {}

  // x: m rows (x_stride apart) in x_dtype, float32 or bfloat16; y: [m, n], contiguous, in x_dtype.
  // Not thread-safe: one thread stages, then every thread may run blocks.
  void stage(const SkinnyWeight& weight, const void* x, int64_t x_stride, at::ScalarType x_dtype, void* y, int64_t m);
  int64_t blocks() const;
  int64_t grain() const;  // blocks per parallel chunk: ~64 KiB of weights, so small matrices stay on one thread
  void run_blocks(int64_t begin, int64_t end) const { body_(*this, begin, end); }

 private:
  template <typename W, typename X, typename Y>
  friend void run_blocks_of(const SkinnyMatmul& mm, int64_t begin, int64_t end);

  int64_t isa_;
  // set by stage()
  SkinnyWeight weight_{};
  const void* x_ = nullptr;
  int64_t x_stride_ = 0, m_ = 0;
  void* y_ = nullptr;
  const float* x_scales_ = nullptr;
  void (*body_)(const SkinnyMatmul&, int64_t, int64_t) = nullptr;
  std::vector<uint8_t> staged_;  // x in the body's form, where that is not x itself
  std::vector<float> staged_scales_;
};
