// Helpers of the device-generic glue files (csrc/conv_relu_pool.cpp, csrc/conv_transpose.cpp), which compose ATen's
// convolution (oneDNN / cuDNN) with fastcnn's per-device epilogue kernels and register the same functions for CPU
// and, when built with CUDA, CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "fastcnn/checks.h"

namespace fastcnn {

// The fused epilogue (fastcnn::bias_relu_pool) through the dispatcher, so each device's kernel serves the glue.
inline std::tuple<at::Tensor, at::Tensor> call_bias_relu_pool(const at::Tensor& conv,
                                                              const c10::optional<at::Tensor>& bias,
                                                              c10::string_view pool, at::IntArrayRef pool_size,
                                                              at::IntArrayRef pool_stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::bias_relu_pool", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const c10::optional<at::Tensor>&,
                                                                 c10::string_view, at::IntArrayRef, at::IntArrayRef,
                                                                 const c10::optional<at::Tensor>&)>();
  return op.call(conv, bias, pool, pool_size, pool_stride, /*scale=*/c10::nullopt);
}

// And its backward: (gradient at the convolution output, grad_bias or an empty tensor).
inline std::tuple<at::Tensor, at::Tensor> call_bias_relu_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, c10::SymIntArrayRef conv_size,
    c10::string_view pool, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool bias_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::bias_relu_pool_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::SymIntArrayRef,
                                                                 c10::string_view, at::IntArrayRef, at::IntArrayRef,
                                                                 bool)>();
  return op.call(grad_out, out, code, conv_size, pool, pool_size, pool_stride, bias_grad);
}

// A gradient in its tensor's memory format (ATen may return another), or an empty tensor when it was not computed:
// the op schemas return Tensors, never None.
inline at::Tensor grad_in_format_of(const at::Tensor& grad, const at::Tensor& t) {
  return grad.defined() ? grad.contiguous(memory_format_of(t)) : t.new_empty({0});
}

// A convolution op's (grad_input, grad_weight, grad_bias) as its schema returns them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_grads(const at::Tensor& grad_input,
                                                                 const at::Tensor& grad_weight,
                                                                 const at::Tensor& grad_bias, const at::Tensor& input,
                                                                 const at::Tensor& weight) {
  return {grad_in_format_of(grad_input, input), grad_in_format_of(grad_weight, weight),
          grad_bias.defined() ? grad_bias.contiguous() : weight.new_empty({0})};
}

}  // namespace fastcnn

// Registers the functions `op` and `op_backward` as the kernels of fastcnn::op and fastcnn::op_backward for CPU
// and, in a CUDA build, for CUDA.
#define FASTCNN_OP_AND_BACKWARD(op) \
  m.impl(#op, &op);                 \
  m.impl(#op "_backward", &op##_backward);
#ifdef FASTCNN_WITH_CUDA
#define FASTCNN_IMPL_CPU_AND_CUDA(op)                                      \
  TORCH_LIBRARY_IMPL(fastcnn, CPU, m) { FASTCNN_OP_AND_BACKWARD(op) }     \
  TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) { FASTCNN_OP_AND_BACKWARD(op) }
#else
#define FASTCNN_IMPL_CPU_AND_CUDA(op) \
  TORCH_LIBRARY_IMPL(fastcnn, CPU, m) { FASTCNN_OP_AND_BACKWARD(op) }
#endif
