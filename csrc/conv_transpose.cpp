// fastcnn::conv_transpose2d_act: act(conv_transpose2d(input, weight, bias)) and its backward, for CPU and CUDA.
// The stride-phase math is documented in fastcnn/reference/conv_transpose.py.
//
// Forward, two paths:
//  * kernel == stride, dilation 1, one group (the 2x2 stride-2 U-Net upsampling and its kin): each output pixel
//    gets exactly one tap, so the layer is ONE GEMM (cuBLAS / oneDNN via at::mm) with no zero insertion and no
//    col2im, followed by one pass that pixel-shuffles the GEMM result into place with the bias and activation fused
//    (fastcnn/conv_transpose.h, per-device kernels). The GEMM's column order follows the input's layout so that the
//    pass reads and writes unit-stride runs: [ky, kx, C_out] for channels_last, [C_out, ky, kx] rows for NCHW.
//  * anything else: ATen's transposed convolution (cuDNN / oneDNN, which split by phase themselves) without its
//    bias, then fastcnn's one-pass bias + ReLU epilogue (fastcnn::bias_relu_pool with pool="none"); without an
//    activation the bias goes straight to ATen, which is what eager does.
// Backward: the ReLU mask comes from the saved output (y > 0) and grad_bias is reduced in the same pass
// (fastcnn::bias_relu_pool_backward); then ATen's convolution_backward, for which a transposed convolution's input
// gradient is an ordinary strided convolution of dy and the weight gradient swaps the roles of x and dy.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"

#include <tuple>

namespace fastcnn {
namespace {

bool parse_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "relu", "fastcnn: activation must be 'none' or 'relu', got '",
              std::string(activation), "'");
  return activation == "relu";
}

at::Tensor relu_epilogue(const at::Tensor& conv, const c10::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::bias_relu_pool", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const c10::optional<at::Tensor>&,
                                                                 c10::string_view, at::IntArrayRef, at::IntArrayRef)>();
  return std::get<0>(op.call(conv, bias, "none", {1, 1}, {1, 1}));
}

std::tuple<at::Tensor, at::Tensor> relu_epilogue_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                          bool bias_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastcnn::bias_relu_pool_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::SymIntArrayRef,
                                                                 c10::string_view, at::IntArrayRef, at::IntArrayRef,
                                                                 bool)>();
  const at::Tensor no_code = out.new_empty({0}, out.options().dtype(at::kByte));
  return op.call(grad_out, out, no_code, c10::fromIntArrayRefSlow(out.sizes().slice(2)), "none", {1, 1}, {1, 1},
                 bias_grad);
}

bool is_one_tap_per_pixel(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  return groups == 1 && weight.size(2) == stride[0] && weight.size(3) == stride[1] && dilation[0] == 1 &&
         dilation[1] == 1;
}

// The k == s path: G = one GEMM, then the fused pixel-shuffle + bias + activation pass.
at::Tensor gemm_shuffle_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                at::IntArrayRef padding, at::IntArrayRef output_padding, bool relu) {
  const int64_t N = input.size(0), C_in = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t C_out = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  const int64_t OH = (H - 1) * KH - 2 * padding[0] + KH + output_padding[0];
  const int64_t OW = (W - 1) * KW - 2 * padding[1] + KW + output_padding[1];
  const at::MemoryFormat fmt = memory_format_of(input);
  at::Tensor gemm;  // viewed as [N, H, W, C_out, KH, KW]
  if (fmt == at::MemoryFormat::ChannelsLast) {
    const at::Tensor x = input.permute({0, 2, 3, 1}).reshape({N * H * W, C_in});
    const at::Tensor w = weight.permute({0, 2, 3, 1}).reshape({C_in, KH * KW * C_out});
    gemm = at::mm(x, w).view({N, H, W, KH, KW, C_out}).permute({0, 1, 2, 5, 3, 4});
  } else {
    const at::Tensor x = input.contiguous().view({N, C_in, H * W});
    const at::Tensor w = weight.reshape({C_in, C_out * KH * KW}).t();
    gemm = at::matmul(w, x).view({N, C_out, KH, KW, H, W}).permute({0, 4, 5, 1, 2, 3});
  }
  at::Tensor out = at::empty({N, C_out, OH, OW}, input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const std::array<int64_t, 2> pad{padding[0], padding[1]};
#ifdef FASTCNN_WITH_CUDA
  if (input.is_cuda()) {
    shuffle_bias_act_cuda(gemm, bias, out, pad, relu);
    return out;
  }
#endif
  shuffle_bias_act_cpu(gemm, bias, out, pad, relu);
  return out;
}

at::Tensor conv_transpose2d_act(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                int64_t groups, at::IntArrayRef dilation, c10::string_view activation) {
  check_floating_4d(input, "input");
  check_floating_4d(weight, "weight");
  const bool relu = parse_activation(activation);
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (is_one_tap_per_pixel(weight, stride, dilation, groups) && input.numel() > 0) {
    return gemm_shuffle_forward(input, weight, b, padding, output_padding, relu);
  }
  const at::MemoryFormat fmt = memory_format_of(input);
  at::Tensor conv = at::convolution(input, weight, relu ? c10::optional<at::Tensor>() : bias, stride, padding,
                                    dilation, /*transposed=*/true, output_padding, groups);
  conv = conv.contiguous(fmt);
  return relu ? relu_epilogue(conv, bias) : conv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_act_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, c10::string_view activation, std::array<bool, 3> output_mask) {
  check_floating_4d(grad_out, "grad_out");
  check_floating_4d(input, "input");
  check_floating_4d(weight, "weight");
  at::Tensor grad_y, grad_bias;
  if (parse_activation(activation)) {
    std::tie(grad_y, grad_bias) = relu_epilogue_backward(grad_out, out, output_mask[2]);
  } else {
    grad_y = grad_out;
    if (output_mask[2]) grad_bias = grad_out.sum({0, 2, 3});
  }
  at::Tensor grad_input, grad_weight;
  if (output_mask[0] || output_mask[1]) {
    std::tie(grad_input, grad_weight, std::ignore) = at::convolution_backward(
        grad_y, input, weight, /*bias_sizes=*/c10::nullopt, stride, padding, dilation, /*transposed=*/true,
        output_padding, groups, {output_mask[0], output_mask[1], false});
  }
  const auto like = [&](const at::Tensor& grad, const at::Tensor& t) {
    return grad.defined() ? grad.contiguous(memory_format_of(t)) : t.new_empty({0});
  };
  return {like(grad_input, input), like(grad_weight, weight),
          grad_bias.defined() ? grad_bias.contiguous() : weight.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("conv_transpose2d_act", &conv_transpose2d_act);
  m.impl("conv_transpose2d_act_backward", &conv_transpose2d_act_backward);
}

#ifdef FASTCNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("conv_transpose2d_act", &conv_transpose2d_act);
  m.impl("conv_transpose2d_act_backward", &conv_transpose2d_act_backward);
}
#endif

}  // namespace fastcnn
