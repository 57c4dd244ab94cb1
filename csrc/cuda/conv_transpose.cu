// CUDA kernel of the k == s transposed convolution's pixel-shuffle epilogue (math in fastcnn/conv_transpose.h);
// cpu/conv_transpose.cpp is the behavioural model (same rounding, same NaN-keeping ReLU). One thread per output
// element in the output's memory order, so consecutive threads write consecutive addresses; with a channels_last
// GEMM (columns [ky, kx, C_out]) they also read consecutive addresses. Grid-stride loop, int64 indexing, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"

#include <algorithm>

namespace fastcnn {
namespace {

constexpr int kThreads = 256;

struct Shuffle {
  int64_t N, C, OH, OW, H, W, KH, KW, pad_h, pad_w;
  int64_t gs[6];  // strides of the GEMM view [N, H, W, C, KH, KW]
};

template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    shuffle_bias_act_kernel(const scalar_t* __restrict__ gemm, const scalar_t* __restrict__ bias,
                            scalar_t* __restrict__ out, Shuffle s, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = s.N * s.C * s.OH * s.OW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t c, ox, oy, n;
    if (kChannelsLast) {
      c = i % s.C;
      ox = (i / s.C) % s.OW;
      oy = (i / (s.C * s.OW)) % s.OH;
      n = i / (s.C * s.OW * s.OH);
    } else {
      ox = i % s.OW;
      oy = (i / s.OW) % s.OH;
      c = (i / (s.OW * s.OH)) % s.C;
      n = i / (s.OW * s.OH * s.C);
    }
    const int64_t iy = (oy + s.pad_h) / s.KH, ky = (oy + s.pad_h) % s.KH;
    const int64_t ix = (ox + s.pad_w) / s.KW, kx = (ox + s.pad_w) % s.KW;
    acc_t v = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[c]);
    if (iy < s.H && ix < s.W) {
      v += static_cast<acc_t>(
          gemm[n * s.gs[0] + iy * s.gs[1] + ix * s.gs[2] + c * s.gs[3] + ky * s.gs[4] + kx * s.gs[5]]);
    }
    const scalar_t r = static_cast<scalar_t>(v);
    out[i] = relu && static_cast<acc_t>(r) <= acc_t(0) ? scalar_t(0) : r;
  }
}

}  // namespace

void shuffle_bias_act_cuda(const at::Tensor& gemm, const at::Tensor& bias, const at::Tensor& out,
                           std::array<int64_t, 2> padding, bool relu) {
  const c10::cuda::CUDAGuard guard(out.device());
  Shuffle s{out.size(0), out.size(1), out.size(2), out.size(3), gemm.size(1), gemm.size(2), gemm.size(4),
            gemm.size(5), padding[0], padding[1], {}};
  for (int d = 0; d < 6; ++d) s.gs[d] = gemm.stride(d);
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  const bool channels_last = memory_format_of(out) == at::MemoryFormat::ChannelsLast;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads,
                                           int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "shuffle_bias_act_cuda", [&] {
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (channels_last) {
      shuffle_bias_act_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          gemm.const_data_ptr<scalar_t>(), bp, out.mutable_data_ptr<scalar_t>(), s, relu);
    } else {
      shuffle_bias_act_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          gemm.const_data_ptr<scalar_t>(), bp, out.mutable_data_ptr<scalar_t>(), s, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastcnn
