// The CPU 3x3 convolution by Winograd's minimal filtering F(2x2, 3x3) (csrc/cpu/winograd.cpp), which the fused
// blocks use in place of ATen's (oneDNN's direct) convolution where it applies and was measured faster.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastcnn {

// True where winograd_conv3x3 computes conv2d(input, weight, None, stride, padding, dilation, groups) and was
// measured the faster CPU convolution: float32 channels_last CPU input, a 3x3 kernel at stride 1, dilation 1, one
// group, padding <= 2 (so that the input gradient, a 3x3 convolution with padding 2 - p, qualifies too), and enough
// tiles, channels and work (the thresholds and their measurements are in winograd.cpp).
bool winograd_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The same rule whatever the input's memory format (winograd_conv3x3 reads a channels_last copy of any other).
bool winograd_fits(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// conv2d(input, weight, None, stride=1, padding) for a 3x3 weight (C_out, C_in, 3, 3), returned channels_last.
// With flip_weight it convolves with weight.transpose(0, 1).flip(2, 3) instead: the input gradient of a 3x3
// convolution is winograd_conv3x3(grad_output, weight, 2 - padding, true).
at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding,
                            bool flip_weight);

// The weight gradient (C_out, C_in, 3, 3) of winograd_conv3x3(input, weight, padding) for grad_out (N, C_out, HO,
// WO), by Winograd's F(3x3, 2x2) (winograd_backward.cpp), in weight_format; undefined where a value is not finite.
at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef padding,
                                        at::MemoryFormat weight_format);

// (grad_input, grad_weight) of conv2d(input, weight, None, stride, padding, dilation, groups), each undefined unless
// output_mask asks for it: the input gradient by Winograd where winograd_applies to the forward (the 3x3
// convolution of grad_conv with the weight transposed and turned by 180 degrees, padding 2 - p), the weight gradient
// (winograd_conv3x3_weight_grad) where winograd_fits with at least 128 channels on both sides, whatever the input's
// layout (winograd_backward.cpp); else by ATen's
// convolution_backward. Any device (Winograd applies on CPU only).
std::tuple<at::Tensor, at::Tensor> convolution_backward_winograd(const at::Tensor& grad_conv, const at::Tensor& input,
                                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 int64_t groups, std::array<bool, 2> output_mask);

// The fused block's forward for a 2x2 stride-2 max pool: (pool(relu(conv + bias)), code), both channels_last,
// exactly what fastcnn::bias_relu_pool returns on winograd_conv3x3's output, with the pool taken in the output
// transform (the full-size convolution output is never written). None where an output is not finite: the caller
// then runs the direct convolution (see winograd_conv3x3).
std::optional<std::tuple<at::Tensor, at::Tensor>> winograd_conv3x3_relu_maxpool(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef padding);

}  // namespace fastcnn
