// CUDA kernel of the transposed convolution's stride-phase store (math and the per-pixel arithmetic, phase_value and
// bias_act, in fastcnn/conv_transpose.h, shared with cpu/conv_transpose.cpp, the behavioural model). One launch for
// all phases: one thread per output element in the output's memory order, so consecutive threads write consecutive
// addresses; with channel-last phase tensors they also read consecutive addresses. Grid-stride loop, int64
// indexing, no atomics.
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

template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    phase_store_kernel(const PhaseTable<scalar_t> table, const scalar_t* __restrict__ bias,
                       scalar_t* __restrict__ out, int64_t N, int64_t C, int64_t OH, int64_t OW, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * C * OH * OW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t c, ox, oy, n;
    if (kChannelsLast) {
      c = i % C;
      ox = (i / C) % OW;
      oy = (i / (C * OW)) % OH;
      n = i / (C * OW * OH);
    } else {
      ox = i % OW;
      oy = (i / OW) % OH;
      c = (i / (OW * OH)) % C;
      n = i / (OW * OH * C);
    }
    const acc_t b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[c]);
    out[i] = bias_act<scalar_t>(phase_value<scalar_t, acc_t>(table, n, c, oy, ox), b, relu);
  }
}

}  // namespace

void phase_store_bias_act_cuda(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                               std::array<int64_t, 2> stride, std::array<int64_t, 2> padding, bool relu) {
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  const bool channels_last = memory_format_of(out) == at::MemoryFormat::ChannelsLast;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads,
                                           int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "phase_store_bias_act_cuda", [&] {
    const auto table = make_phase_table<scalar_t>(phases, stride, padding);
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const int64_t N = out.size(0), C = out.size(1), OH = out.size(2), OW = out.size(3);
    if (channels_last) {
      phase_store_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          table, bp, out.mutable_data_ptr<scalar_t>(), N, C, OH, OW, relu);
    } else {
      phase_store_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          table, bp, out.mutable_data_ptr<scalar_t>(), N, C, OH, OW, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastcnn
