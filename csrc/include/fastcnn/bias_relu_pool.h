// What the CPU and CUDA drivers of the fused epilogue (fastcnn::bias_relu_pool and bias_relu_pool_backward) share:
// their argument checks, the tensors laid out in one memory format, and the outputs they allocate. Each driver then
// only launches its device's kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "fastcnn/checks.h"
#include "fastcnn/pool_window.h"

#include <tuple>

namespace fastcnn {

// One checked forward call: conv in its memory format, and the empty pooled output and code (code: an empty tensor
// for pool="none").
struct EpilogueForward {
  PoolMode mode;
  PoolWindow win;
  at::MemoryFormat fmt;
  at::Tensor conv, out, code;
};

inline EpilogueForward prepare_epilogue_forward(const at::Tensor& conv_in, const c10::optional<at::Tensor>& bias,
                                                c10::string_view pool, at::IntArrayRef pool_size,
                                                at::IntArrayRef pool_stride, const c10::optional<at::Tensor>& scale) {
  const PoolMode mode = parse_pool(pool);
  const PoolWindow win{pool_size[0], pool_size[1], pool_stride[0], pool_stride[1]};
  check_floating_4d(conv_in, "conv");
  check_channel_vector(bias, conv_in, "bias");
  check_channel_vector(scale, conv_in, "scale");
  check_pool_window(mode, win);
  const at::MemoryFormat fmt = memory_format_of(conv_in);
  at::Tensor conv = conv_in.contiguous(fmt);
  const auto [ph, pw] = pooled_size(conv.size(2), conv.size(3), mode, win);
  at::Tensor out = at::empty({conv.size(0), conv.size(1), ph, pw}, conv.options().memory_format(fmt));
  at::Tensor code = mode == PoolMode::None ? at::empty({0}, conv.options().dtype(at::kByte))
                                           : at::empty_like(out, out.options().dtype(at::kByte));
  return {mode, win, fmt, std::move(conv), std::move(out), std::move(code)};
}

// One checked backward call: the pooled tensors in one memory format (so a single index serves all three), the
// conv size, the empty gradient at z = conv * scale + bias and grad_bias ((C,) when bias_grad, else empty); with a
// scale, also the scale (opmath, contiguous), the convolution output in the same format when grad_scale is wanted
// (else undefined) and grad_scale ((C,) in scale's dtype, or empty).
struct EpilogueBackward {
  PoolMode mode;
  PoolWindow win;
  at::MemoryFormat fmt;
  int64_t H, W;
  at::Tensor grad_out, out, code, grad_conv, grad_bias;
  at::Tensor scale, conv, grad_scale;
};

inline EpilogueBackward prepare_epilogue_backward(const at::Tensor& grad_out_in, const at::Tensor& out_in,
                                                  const at::Tensor& code_in, c10::SymIntArrayRef conv_size,
                                                  c10::string_view pool, at::IntArrayRef pool_size,
                                                  at::IntArrayRef pool_stride, bool bias_grad,
                                                  const c10::optional<at::Tensor>& scale = c10::nullopt,
                                                  const c10::optional<at::Tensor>& conv = c10::nullopt) {
  const PoolMode mode = parse_pool(pool);
  const PoolWindow win{pool_size[0], pool_size[1], pool_stride[0], pool_stride[1]};
  check_pool_window(mode, win);
  check_pooled_triplet(grad_out_in, out_in, code_in, mode);
  // The kernels read all three through raw pointers on one device.
  TORCH_CHECK(out_in.device() == grad_out_in.device() &&
                  (mode == PoolMode::None || code_in.device() == grad_out_in.device()),
              "fastcnn: grad_out, out and code must be on the same device");
  const int64_t H = conv_size[0].expect_int(), W = conv_size[1].expect_int();
  const auto expected = pooled_size(H, W, mode, win);
  TORCH_CHECK(out_in.size(2) == expected[0] && out_in.size(3) == expected[1], "fastcnn: conv_size (", H, ", ", W,
              ") does not pool to out's spatial size ", out_in.sizes());
  const at::MemoryFormat fmt = memory_format_of(out_in);
  EpilogueBackward b{mode, win, fmt, H, W};
  b.grad_out = grad_out_in.contiguous(fmt);
  b.out = out_in.contiguous(fmt);
  b.code = mode == PoolMode::None ? code_in : code_in.contiguous(fmt);
  const int64_t N = b.out.size(0), C = b.out.size(1);
  b.grad_conv = at::empty({N, C, H, W}, b.out.options().memory_format(fmt));
  b.grad_bias = at::empty({bias_grad ? C : 0}, b.out.options());
  if (scale.has_value() && scale->defined()) {
    check_channel_vector(scale, b.out, "scale");
    b.scale = scale->to(at::toOpMathType(b.out.scalar_type())).contiguous();
    const bool scale_grad = conv.has_value() && conv->defined();
    if (scale_grad) {
      TORCH_CHECK(conv->dim() == 4 && conv->size(0) == N && conv->size(1) == C && conv->size(2) == H &&
                      conv->size(3) == W && conv->scalar_type() == b.out.scalar_type() &&
                      conv->device() == b.out.device(),
                  "fastcnn: conv must be the (", N, ", ", C, ", ", H, ", ", W, ") convolution output in out's dtype "
                  "and device, got ", conv->sizes(), " ", conv->scalar_type());
      b.conv = conv->contiguous(fmt);
    }
    b.grad_scale = at::empty({scale_grad ? C : 0}, scale->options());
  }
  return b;
}

using ScaledBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, c10::string_view, at::IntArrayRef,
    at::IntArrayRef, bool, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&);

// fastcnn::bias_relu_pool_backward: a device's bias_relu_pool_scaled_backward driver without a scale.
template <ScaledBackward scaled>
std::tuple<at::Tensor, at::Tensor> unscaled_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                     const at::Tensor& code, c10::SymIntArrayRef conv_size,
                                                     c10::string_view pool, at::IntArrayRef pool_size,
                                                     at::IntArrayRef pool_stride, bool bias_grad) {
  auto [grad_conv, grad_bias, no_scale] =
      scaled(grad_out, out, code, conv_size, pool, pool_size, pool_stride, bias_grad, c10::nullopt, c10::nullopt);
  return {grad_conv, grad_bias};
}

}  // namespace fastcnn
