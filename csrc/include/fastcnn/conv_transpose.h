// The stride-phase store of the transposed convolution (csrc/conv_transpose.cpp), one kernel per device.
//
// Along one axis, with stride s and padding p, output row oy belongs to phase r = (oy + p) mod s and to row
// t = (oy + p) div s of that phase (fastcnn/reference/conv_transpose.py derives why). The host computes, for each
// phase (rh, rw), a tensor P[n, co, t, u] holding the sum of that phase's taps - one ordinary convolution of the
// input with the phase's sub-kernel, or (kernel == stride) one slice of a single GEMM - and the store writes
//   out[n, co, oy, ox] = act(P_(rh, rw)[n, co, t, u] + bias[co]),   P read as zero where t or u is past its end
// or where no tap reaches the phase (those outputs hold only the bias). The sum is rounded to the output dtype before
// the ReLU, as eager's separate ReLU sees it, and the ReLU keeps NaN (only v <= 0 becomes 0).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <array>
#include <vector>

namespace fastcnn {

// Phases one store handles: strides up to 8x8 (the host routes larger ones to ATen).
constexpr int kMaxPhases = 64;

// Raw views of the phase tensors, passed by value to a CUDA kernel (about 3.6 KB, under the 4 KB parameter limit).
template <typename scalar_t>
struct PhaseTable {
  const scalar_t* data[kMaxPhases];  // nullptr: no tap reaches the phase
  int64_t strides[kMaxPhases][4];    // of P's [n, co, t, u]
  int64_t len_h[kMaxPhases];
  int64_t len_w[kMaxPhases];
  int64_t stride_h, stride_w, pad_h, pad_w;
};

// phases[rh * stride_w + rw]: P of phase (rh, rw) as a [N, C_out, L_h, L_w] view (any strides) or undefined.
template <typename scalar_t>
PhaseTable<scalar_t> make_phase_table(const std::vector<at::Tensor>& phases, std::array<int64_t, 2> stride,
                                      std::array<int64_t, 2> padding) {
  TORCH_CHECK(static_cast<int64_t>(phases.size()) == stride[0] * stride[1] && phases.size() <= kMaxPhases,
              "fastcnn: phase store got ", phases.size(), " phases for stride (", stride[0], ", ", stride[1], ")");
  PhaseTable<scalar_t> table{};
  for (size_t i = 0; i < phases.size(); ++i) {
    table.data[i] = phases[i].defined() ? phases[i].const_data_ptr<scalar_t>() : nullptr;
    for (int d = 0; d < 4 && phases[i].defined(); ++d) table.strides[i][d] = phases[i].stride(d);
    table.len_h[i] = phases[i].defined() ? phases[i].size(2) : 0;
    table.len_w[i] = phases[i].defined() ? phases[i].size(3) : 0;
  }
  table.stride_h = stride[0];
  table.stride_w = stride[1];
  table.pad_h = padding[0];
  table.pad_w = padding[1];
  return table;
}

// P_(phase)[n, co, t, u] of output pixel (oy, ox), or zero; the arithmetic both device kernels share.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t phase_value(const PhaseTable<scalar_t>& table, int64_t n, int64_t co, int64_t oy,
                                         int64_t ox) {
  const int64_t ay = oy + table.pad_h, ax = ox + table.pad_w;
  const int64_t phase = (ay % table.stride_h) * table.stride_w + ax % table.stride_w;
  const int64_t t = ay / table.stride_h, u = ax / table.stride_w;
  const scalar_t* p = table.data[phase];
  if (p == nullptr || t >= table.len_h[phase] || u >= table.len_w[phase]) return acc_t(0);
  const int64_t* s = table.strides[phase];
  return static_cast<acc_t>(p[n * s[0] + co * s[1] + t * s[2] + u * s[3]]);
}

// act(x + b) rounded to scalar_t after the add; the ReLU keeps NaN.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t bias_act(acc_t x, acc_t b, bool relu) {
  const scalar_t v = static_cast<scalar_t>(x + b);
  return relu && static_cast<acc_t>(v) <= acc_t(0) ? scalar_t(0) : v;
}

// out: [N, C_out, OH, OW], contiguous or channels_last, written in full; bias: [C_out] or undefined.
void phase_store_bias_act_cpu(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                              std::array<int64_t, 2> stride, std::array<int64_t, 2> padding, bool relu);
// The whole forward of kernel == stride (one group, dilation 1) for a channels_last float32/float64 CPU input without
// padding or output_padding: BLAS GEMMs over blocks of input rows into a cache-sized buffer, each block's output rows
// written from it with the bias and activation (csrc/cpu/conv_transpose.cpp). An undefined tensor for any other call
// (the caller then takes the GEMM + phase store path).
at::Tensor gemm_forward_channels_last_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                          at::IntArrayRef padding, at::IntArrayRef output_padding, bool relu);
#ifdef FASTCNN_WITH_CUDA
void phase_store_bias_act_cuda(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                               std::array<int64_t, 2> stride, std::array<int64_t, 2> padding, bool relu);
#endif

}  // namespace fastcnn
