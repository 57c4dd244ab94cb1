// Checks and shape helpers shared by the CPU and CUDA kernels. They guard the kernels' memory safety when an op is
// called directly through torch.ops; the user-facing argument checks, with their friendlier messages, live in
// fastcnn/ops/ and run before any backend.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "fastcnn/pool_window.h"

#include <array>

namespace fastcnn {

// channels_last when x is laid out NHWC (and not also plainly contiguous): the rule every fastcnn output follows.
inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Largest window each code can describe: a max offset fits a byte, an avg bit field has 8 bits.
inline void check_pool_window(PoolMode mode, const PoolWindow& win) {
  if (mode == PoolMode::None) return;
  TORCH_CHECK(win.kh > 0 && win.kw > 0 && win.sh > 0 && win.sw > 0,
              "fastcnn: pool_size and pool_stride must be positive, got (", win.kh, ", ", win.kw, ") and (",
              win.sh, ", ", win.sw, ")");
  TORCH_CHECK(mode != PoolMode::Max || win.area() <= 256,
              "fastcnn: max pooling supports windows of at most 256 elements, got ", win.kh, "x", win.kw);
  TORCH_CHECK(mode != PoolMode::Avg || win.area() <= 8,
              "fastcnn: avg pooling supports windows of at most 8 elements, got ", win.kh, "x", win.kw);
}

// Pooled spatial size (floor mode, no padding); the pool-less mode keeps the conv size.
inline std::array<int64_t, 2> pooled_size(int64_t h, int64_t w, PoolMode mode, const PoolWindow& win) {
  if (mode == PoolMode::None) return {h, w};
  TORCH_CHECK(h >= win.kh && w >= win.kw, "fastcnn: the convolution output (", h, "x", w,
              ") is smaller than the pool window (", win.kh, "x", win.kw, ")");
  return {(h - win.kh) / win.sh + 1, (w - win.kw) / win.sw + 1};
}

inline void check_floating_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastcnn: ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastcnn: ", name, " must be floating point, got ",
              t.scalar_type());
}

// An optional per-channel vector of the epilogue (bias, scale): shape (C,), on conv's device, in conv's dtype or its
// accumulation dtype (at::opmath_type: float32 for float16/bfloat16).
inline void check_channel_vector(const c10::optional<at::Tensor>& t, const at::Tensor& conv, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == conv.size(1), "fastcnn: ", name, " must have shape (", conv.size(1),
              "), got ", t->sizes());
  TORCH_CHECK(t->device() == conv.device(), "fastcnn: ", name, " must be on the convolution's device ",
              conv.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == conv.scalar_type() || t->scalar_type() == at::toOpMathType(conv.scalar_type()),
              "fastcnn: ", name, " must have the convolution's dtype ", conv.scalar_type(), " or ",
              at::toOpMathType(conv.scalar_type()), ", got ", t->scalar_type());
}

// grad_out, out and code of the backward must describe the same pooled tensor.
inline void check_pooled_triplet(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code,
                                 PoolMode mode) {
  check_floating_4d(grad_out, "grad_out");
  TORCH_CHECK(out.sizes() == grad_out.sizes() && out.scalar_type() == grad_out.scalar_type(),
              "fastcnn: out must match grad_out's shape and dtype");
  if (mode != PoolMode::None) {
    TORCH_CHECK(code.sizes() == out.sizes() && code.scalar_type() == at::kByte,
                "fastcnn: code must be a uint8 tensor of out's shape");
  }
}

}  // namespace fastcnn
