// The pixel-shuffle epilogue of the k == s transposed convolution (csrc/conv_transpose.cpp), one kernel per device.
//
// With kernel == stride (dilation 1) every output pixel receives exactly one tap, so the layer is one GEMM whose
// result G[n, iy, ix, co, ky, kx] = sum_ci x[n, ci, iy, ix] * w[ci, co, ky, kx] only has to be moved into place:
//   out[n, co, oy, ox] = act(G[n, iy, ix, co, ky, kx] + bias[co]),  iy = (oy + p_h) / kh, ky = (oy + p_h) % kh
// (likewise in x), with G read as zero where iy >= H or ix >= W (the output_padding rows and columns, which hold
// only the bias). The sum is rounded to the output dtype before the ReLU, as eager's separate ReLU sees it.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace fastcnn {

// gemm: a 6-D view [N, H, W, C_out, kh, kw] of the GEMM result (any strides); out: [N, C_out, OH, OW], contiguous
// or channels_last, written in full; bias: [C_out] or undefined.
void shuffle_bias_act_cpu(const at::Tensor& gemm, const at::Tensor& bias, const at::Tensor& out,
                          std::array<int64_t, 2> padding, bool relu);
#ifdef FASTCNN_WITH_CUDA
void shuffle_bias_act_cuda(const at::Tensor& gemm, const at::Tensor& bias, const at::Tensor& out,
                           std::array<int64_t, 2> padding, bool relu);
#endif

}  // namespace fastcnn
