// The fused block on top of a convolution: on CPU, fastcnn's Winograd F(2x2, 3x3) where its rule says it is faster
// (csrc/cpu/winograd.cpp), else ATen's (oneDNN on CPU, cuDNN on CUDA). The convolution runs without its bias, then
// ONE epilogue pass (fastcnn::bias_relu_pool, a per-device kernel) adds the bias, applies ReLU and the pool, and
// writes only the pooled output and its compact code. The backward rebuilds the gradient of the convolution output
// from the pooled gradient and the code, then computes the input gradient (Winograd again where the forward ran
// it on channels_last input) and the weight gradient (Winograd's wherever the shape fits, in either layout; see
// convolution_backward_winograd), else ATen's convolution_backward.
// The same device-generic code serves CPU and CUDA; only the epilogue kernels differ. (On CPU, oneDNN's fused
// conv + bias + ReLU post-ops, mkldnn::_convolution_pointwise, followed by a pool-only pass, was measured no faster:
// the convolution costs the same with or without its bias and ReLU, and the epilogue pass stays.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastcnn/checks.h"
#include "fastcnn/device_generic_glue.h"
#include "fastcnn/winograd.h"

#include <tuple>

namespace fastcnn {
namespace {

std::tuple<at::Tensor, at::Tensor> conv2d_relu_pool(const at::Tensor& input, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                    c10::string_view pool, at::IntArrayRef pool_size,
                                                    at::IntArrayRef pool_stride) {
  check_floating_4d(input, "input");
  const bool winograd = winograd_applies(input, weight, stride, padding, dilation, groups);
  const bool max_pool_2x2 = pool == "max" && pool_size[0] == 2 && pool_size[1] == 2 && pool_stride[0] == 2 &&
                            pool_stride[1] == 2;
  // The pool in Winograd's output transform (a non-finite output runs direct). An NCHW input takes this path too,
  // through a channels_last copy of it (one pass, small next to the convolution), and gets its NCHW output back from
  // the pooled one, a quarter the size: the forward's error stays within the benchmarks' accuracy rule against
  // oneDNN's NCHW convolution, where the input gradient's does not (winograd.cpp), so that stays oneDNN's.
  if (max_pool_2x2 && winograd_fits(input, weight, stride, padding, dilation, groups)) {
    if (auto fused = winograd_conv3x3_relu_maxpool(input, weight, bias, padding)) {
      const auto format = memory_format_of(input);
      auto& [out, code] = *fused;
      return {out.contiguous(format), code.contiguous(format)};
    }
  }
  at::Tensor conv = winograd && !max_pool_2x2
                        ? winograd_conv3x3(input, weight, padding, /*flip_weight=*/false)
                        : at::convolution(input, weight, /*bias=*/c10::nullopt, stride, padding, dilation,
                                          /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  return call_bias_relu_pool(conv.contiguous(memory_format_of(input)), bias, pool, pool_size, pool_stride);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view pool, at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
    std::array<bool, 3> output_mask) {
  check_floating_4d(input, "input");
  check_floating_4d(weight, "weight");
  // Convolution output size: floor((size + 2p - d(k-1) - 1) / s) + 1 per spatial axis.
  std::vector<c10::SymInt> conv_size;
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t extent = dilation[axis] * (weight.size(2 + axis) - 1) + 1;
    conv_size.emplace_back((input.size(2 + axis) + 2 * padding[axis] - extent) / stride[axis] + 1);
  }
  auto [grad_conv, grad_bias] = call_bias_relu_pool_backward(grad_out, out, code, conv_size, pool, pool_size,
                                                             pool_stride, output_mask[2]);
  // Where the forward ran Winograd, so does the input gradient.
  auto [grad_input, grad_weight] = convolution_backward_winograd(grad_conv, input, weight, stride, padding, dilation,
                                                                 groups, {output_mask[0], output_mask[1]});
  return conv_grads(grad_input, grad_weight, grad_bias, input, weight);
}

}  // namespace

FASTCNN_IMPL_CPU_AND_CUDA(conv2d_relu_pool)

}  // namespace fastcnn
