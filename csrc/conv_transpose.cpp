// fastcnn::conv_transpose2d_act: act(conv_transpose2d(input, weight, bias)) and its backward, for CPU and CUDA.
// The stride-phase math is documented in fastcnn/reference/conv_transpose.py.
//
// Forward by stride-phase decomposition (no zero insertion, no col2im): the output splits into stride_h x stride_w
// phases, each the sum of the taps that reach it (fastcnn/conv_transpose.h), and one device kernel then writes every
// phase into the interleaved output with the bias and activation fused. The phase sums come from
//  * kernel == stride, dilation 1, one group (the 2x2 stride-2 U-Net upsampling and its kin): ONE GEMM (cuBLAS /
//    oneDNN via at::mm) whose column blocks are the phases. Its column order follows the input's layout so that the
//    store reads and writes unit-stride runs: [ky, kx, C_out] for channels_last, [C_out, ky, kx] rows for NCHW.
//  * otherwise (e.g. kernel 4, stride 2, padding 1: four 2x2 phases): ordinary convolutions (cuDNN / oneDNN via
//    at::convolution) of the input with the phases' flipped sub-kernels (phase_split_forward) - where that is
//    measured faster than ATen's own transposed convolution (use_phase_split: nowhere yet). Elsewhere ATen's
//    transposed convolution without its bias, then fastcnn's one-pass bias + ReLU epilogue (fastcnn::bias_relu_pool
//    with pool="none"); without an activation the bias goes straight to ATen, which is what eager does.
// Backward: the ReLU mask comes from the saved output (y > 0) and grad_bias is reduced in the same pass
// (fastcnn::bias_relu_pool_backward); then ATen's convolution_backward, for which a transposed convolution's input
// gradient is an ordinary strided convolution of dy and the weight gradient swaps the roles of x and dy.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"
#include "fastcnn/device_generic_glue.h"

#include <cstdlib>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

namespace fastcnn {
namespace {

bool parse_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "relu", "fastcnn: activation must be 'none' or 'relu', got '",
              std::string(activation), "'");
  return activation == "relu";
}

at::Tensor relu_epilogue(const at::Tensor& conv, const c10::optional<at::Tensor>& bias) {
  return std::get<0>(call_bias_relu_pool(conv, bias, "none", {1, 1}, {1, 1}));
}

std::tuple<at::Tensor, at::Tensor> relu_epilogue_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                          bool bias_grad) {
  const at::Tensor no_code = out.new_empty({0}, out.options().dtype(at::kByte));
  return call_bias_relu_pool_backward(grad_out, out, no_code, c10::fromIntArrayRefSlow(out.sizes().slice(2)), "none",
                                      {1, 1}, {1, 1}, bias_grad);
}

// The kernels read bias[c] for every output channel through a raw pointer on the input's device: check it here, as
// the op can be called directly through torch.ops (the Python wrapper's friendlier checks run only before it).
void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& input, const at::Tensor& weight,
                int64_t groups) {
  if (!bias.has_value() || !bias->defined()) return;
  const int64_t c_out = weight.size(1) * groups;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, "fastcnn: conv_transpose2d_act: bias must have shape (",
              c_out, ") (weight.size(1) * groups output channels), got ", bias->sizes());
  TORCH_CHECK(bias->device() == input.device(), "fastcnn: conv_transpose2d_act: bias must be on the input's device ",
              input.device(), ", got ", bias->device());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type() ||
                  bias->scalar_type() == at::toOpMathType(input.scalar_type()),
              "fastcnn: conv_transpose2d_act: bias must have the input's dtype ", input.scalar_type(), " or ",
              at::toOpMathType(input.scalar_type()), ", got ", bias->scalar_type());
}

bool is_one_tap_per_pixel(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  return groups == 1 && weight.size(2) == stride[0] && weight.size(3) == stride[1] && dilation[0] == 1 &&
         dilation[1] == 1;
}

// Writes act(P + bias) for every phase into out through the device's one-pass strided store.
void store_phases(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                  at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  if (out.numel() == 0) return;
  const std::array<int64_t, 2> st{stride[0], stride[1]}, pad{padding[0], padding[1]};
#ifdef FASTCNN_WITH_CUDA
  if (out.is_cuda()) {
    phase_store_bias_act_cuda(phases, bias, out, st, pad, relu);
    return;
  }
#endif
  phase_store_bias_act_cpu(phases, bias, out, st, pad, relu);
}

at::Tensor empty_output(const at::Tensor& input, const at::Tensor& weight, int64_t groups, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation) {
  std::array<int64_t, 2> size{};
  for (int d = 0; d < 2; ++d) {
    size[d] = (input.size(2 + d) - 1) * stride[d] - 2 * padding[d] + dilation[d] * (weight.size(2 + d) - 1) +
              output_padding[d] + 1;
  }
  return at::empty({input.size(0), weight.size(1) * groups, size[0], size[1]},
                   input.options().memory_format(memory_format_of(input)));
}

// The k == s path: G = one GEMM; phase (ky, kx) is the slice G[..., ky, kx] (its one tap), row t = input row.
at::Tensor gemm_shuffle_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                bool relu) {
  const int64_t N = input.size(0), C_in = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t C_out = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  at::Tensor gemm;  // viewed as [N, C_out, H, W, KH, KW]
  if (memory_format_of(input) == at::MemoryFormat::ChannelsLast) {
    const at::Tensor x = input.permute({0, 2, 3, 1}).reshape({N * H * W, C_in});
    const at::Tensor w = weight.permute({0, 2, 3, 1}).reshape({C_in, KH * KW * C_out});
    gemm = at::mm(x, w).view({N, H, W, KH, KW, C_out}).permute({0, 5, 1, 2, 3, 4});
  } else {
    const at::Tensor x = input.contiguous().view({N, C_in, H * W});
    const at::Tensor w = weight.reshape({C_in, C_out * KH * KW}).t();
    at::Tensor g;
    if (input.is_cpu()) {
      // One GEMM per sample straight into its slice: at::matmul of a 2-D by a 3-D tensor folds the batch by copying
      // x transposed and then the result back (two copies as large as x and the output; 2 x 5.8 ms of a 23 ms
      // forward on 4x128x28x28 -> 64, fp32, one CPU thread).
      g = at::empty({N, C_out * KH * KW, H * W}, input.options());
      for (int64_t n = 0; n < N; ++n) {
        at::Tensor slice = g.select(0, n);
        at::mm_out(slice, w, x.select(0, n));
      }
    } else {
      g = at::matmul(w, x);
    }
    gemm = g.view({N, C_out, KH, KW, H, W}).permute({0, 1, 4, 5, 2, 3});
  }
  std::vector<at::Tensor> phases;
  for (int64_t ky = 0; ky < KH; ++ky) {
    for (int64_t kx = 0; kx < KW; ++kx) phases.push_back(gemm.select(5, kx).select(4, ky));
  }
  at::Tensor out = empty_output(input, weight, 1, stride, padding, output_padding, {1, 1});
  store_phases(phases, bias, out, stride, padding, relu);
  return out;
}

// The taps of one axis that reach phase r (those with ky*d = r mod s), last first, and the ordinary convolution
// they form: phase row t receives tap ky from input row t - m, m = (ky*d - r) / s, so with the sub-kernel flipped it
// is a correlation with padding m_last (the first tap listed) and dilation d / gcd(s, d) (the spacing of the m's).
struct AxisPhase {
  std::vector<int64_t> taps;
  int64_t padding = 0, dilation = 1;
};

AxisPhase axis_phase(int64_t kernel, int64_t stride, int64_t dilation, int64_t r) {
  AxisPhase a;
  for (int64_t k = kernel - 1; k >= 0; --k) {
    if ((k * dilation - r) % stride == 0) a.taps.push_back(k);
  }
  if (!a.taps.empty()) {
    a.padding = (a.taps.front() * dilation - r) / stride;
    a.dilation = dilation / std::gcd(stride, dilation);
  }
  return a;
}

// The general path: the phases' sums by ordinary convolutions (oneDNN / cuDNN on each phase's flipped sub-kernel:
// every multiply a real one), then one strided store of all phases with the bias and activation. When every phase
// has the same convolution geometry (one group, dilation 1, kernel a multiple of the stride, e.g. k4 s2 p1: four 2x2
// phases with padding 1) the sub-kernels are stacked along the output channels and run as ONE convolution whose
// channel blocks are the phases; otherwise one convolution per phase. A phase no tap reaches holds the bias only.
at::Tensor phase_split_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                               int64_t groups, at::IntArrayRef dilation, bool relu) {
  const int64_t C_in = weight.size(0), C_out_g = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  const int64_t C_out = groups * C_out_g;
  // As a convolution weight [C_out, C_in / groups, KH, KW]: per group, the transpose of [C_in / g, C_out / g].
  const at::Tensor w = weight.view({groups, C_in / groups, C_out_g, KH, KW}).transpose(1, 2).reshape(
      {C_out, C_in / groups, KH, KW});
  const auto taps = [&](const AxisPhase& a) { return at::tensor(a.taps, weight.options().dtype(at::kLong)); };
  std::vector<AxisPhase> rows, cols;
  for (int64_t r = 0; r < stride[0]; ++r) rows.push_back(axis_phase(KH, stride[0], dilation[0], r));
  for (int64_t r = 0; r < stride[1]; ++r) cols.push_back(axis_phase(KW, stride[1], dilation[1], r));
  const auto conv = [&](const at::Tensor& sub, const AxisPhase& ah, const AxisPhase& aw) {
    return at::convolution(input, sub, c10::nullopt, {1, 1}, {ah.padding, aw.padding}, {ah.dilation, aw.dilation},
                           /*transposed=*/false, {0, 0}, groups);
  };
  std::vector<at::Tensor> phases;
  const bool uniform = groups == 1 && dilation[0] == 1 && dilation[1] == 1 && KH % stride[0] == 0 &&
                       KW % stride[1] == 0;
  if (uniform) {
    std::vector<at::Tensor> subs;
    for (const AxisPhase& ah : rows) {
      for (const AxisPhase& aw : cols) subs.push_back(w.index_select(2, taps(ah)).index_select(3, taps(aw)));
    }
    const at::Tensor all = conv(at::cat(subs, 0), rows[0], cols[0]);
    for (size_t k = 0; k < subs.size(); ++k) phases.push_back(all.narrow(1, int64_t(k) * C_out, C_out));
  } else {
    for (const AxisPhase& ah : rows) {
      for (const AxisPhase& aw : cols) {
        const bool reached = !ah.taps.empty() && !aw.taps.empty();
        phases.push_back(reached ? conv(w.index_select(2, taps(ah)).index_select(3, taps(aw)), ah, aw)
                                 : at::Tensor());
      }
    }
  }
  at::Tensor out = empty_output(input, weight, groups, stride, padding, output_padding, dilation);
  store_phases(phases, bias, out, stride, padding, relu);
  return out;
}

// Whether the phase split runs instead of ATen's transposed convolution (kernel != stride). Measured on the
// benchmark's k4s2p1 decoder shapes (batch 2, fp32, one thread on a shared 2-core AMD EPYC; median of 21 interleaved
// runs, phase split vs ATen + fastcnn's epilogue): NHWC 256->128 @28 66.3 vs 62.5 ms, 64->32 @56 19.9 vs 17.9 ms,
// 64->32 @112 73.9 vs 76.9 ms, k3s2p1 32->16 @28 1.24 vs 1.10 ms; NCHW 0.41-0.75x of ATen. oneDNN's deconvolution
// already splits by phase, so on CPU the split is at best at parity and ATen keeps every shape. On CUDA it has not
// been timed yet, so cuDNN keeps it too. FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT=1 forces the split (tests, and timing it
// on a GPU with benchmarks/bench_conv_transpose.py before routing any shape to it here).
bool use_phase_split() {
  const char* force = std::getenv("FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT");
  return force != nullptr && std::string(force) == "1";
}

at::Tensor conv_transpose2d_act(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                int64_t groups, at::IntArrayRef dilation, c10::string_view activation) {
  check_floating_4d(input, "input");
  check_floating_4d(weight, "weight");
  TORCH_CHECK(groups > 0, "fastcnn: conv_transpose2d_act: groups must be positive, got ", groups);
  check_bias(bias, input, weight, groups);
  const bool relu = parse_activation(activation);
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (input.numel() > 0 && stride[0] * stride[1] <= kMaxPhases) {
    if (is_one_tap_per_pixel(weight, stride, dilation, groups)) {
      if (input.is_cpu()) {  // channels_last fp32/fp64 without padding: GEMM blocks stored with bias + ReLU
        at::Tensor out = gemm_forward_channels_last_cpu(input, weight, b, padding, output_padding, relu);
        if (out.defined()) return out;
      }
      return gemm_shuffle_forward(input, weight, b, stride, padding, output_padding, relu);
    }
    if (use_phase_split()) {
      return phase_split_forward(input, weight, b, stride, padding, output_padding, groups, dilation, relu);
    }
  }
  const at::MemoryFormat fmt = memory_format_of(input);
  // Without the activation ATen adds the bias, in the input's dtype (as eager and autocast do). On the CPU it does
  // with the ReLU too when the bias has the input's dtype (oneDNN adds it in its own epilogue), and the ReLU runs in
  // place on ATen's fresh output: the out-of-place bias + ReLU epilogue cost a second output-sized allocation.
  const bool aten_bias_add = !relu || (input.is_cpu() && (!b.defined() || b.scalar_type() == input.scalar_type()));
  const c10::optional<at::Tensor> aten_bias = aten_bias_add && b.defined()
                                                  ? c10::optional<at::Tensor>(b.to(input.scalar_type()))
                                                  : c10::optional<at::Tensor>();
  at::Tensor conv = at::convolution(input, weight, aten_bias, stride, padding,
                                    dilation, /*transposed=*/true, output_padding, groups);
  conv = conv.contiguous(fmt);
  if (!relu) return conv;
  return aten_bias_add ? conv.relu_() : relu_epilogue(conv, bias);
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
  return conv_grads(grad_input, grad_weight, grad_bias, input, weight);
}

}  // namespace

FASTCNN_IMPL_CPU_AND_CUDA(conv_transpose2d_act)

}  // namespace fastcnn
