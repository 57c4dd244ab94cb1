// fastcnn::conv2d_winograd, the bias-free convolution that fastcnn's BatchNorm blocks run on CPU (their convolution
// output feeds a BatchNorm, which cancels any bias): Winograd F(2x2, 3x3) (winograd.cpp) where winograd_applies,
// ATen's convolution (oneDNN) elsewhere. Its backward is convolution_backward_winograd's (winograd.h): Winograd's
// input gradient and weight gradient where the forward was Winograd's, else ATen's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastcnn/device_generic_glue.h"
#include "fastcnn/winograd.h"

#include <array>
#include <tuple>

namespace fastcnn {
namespace {

constexpr std::array<int64_t, 2> kUnit{1, 1};  // stride and dilation: Winograd F(2x2, 3x3) is a stride-1 method

bool runs_winograd(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding) {
  return winograd_applies(input, weight, kUnit, padding, kUnit, /*groups=*/1);
}

at::Tensor conv2d_winograd(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding) {
  check_floating_4d(input, "input");
  check_floating_4d(weight, "weight");
  if (runs_winograd(input, weight, padding)) return winograd_conv3x3(input, weight, padding, /*flip_weight=*/false);
  return at::convolution(input, weight, /*bias=*/c10::nullopt, kUnit, padding, kUnit, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, /*groups=*/1)
      .contiguous(memory_format_of(input));  // ATen's follows a channels_last weight too
}

std::tuple<at::Tensor, at::Tensor> conv2d_winograd_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const at::Tensor& weight, at::IntArrayRef padding,
                                                            std::array<bool, 2> output_mask) {
  check_floating_4d(grad_out, "grad_out");
  check_floating_4d(input, "input");
  check_floating_4d(weight, "weight");
  auto [grad_input, grad_weight] = convolution_backward_winograd(grad_out, input, weight, kUnit, padding, kUnit,
                                                                 /*groups=*/1, output_mask);
  return {grad_in_format_of(grad_input, input), grad_in_format_of(grad_weight, weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("conv2d_winograd", &conv2d_winograd);
  m.impl("conv2d_winograd_backward", &conv2d_winograd_backward);
}

}  // namespace fastcnn
