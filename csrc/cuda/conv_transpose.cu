// CUDA kernel of the transposed convolution's stride-phase store (math and the per-pixel arithmetic, phase_value and
// bias_act, in fastcnn/conv_transpose.h, shared with cpu/conv_transpose.cpp, the behavioural model). One launch for
// all phases: one thread per output element in the output's memory order, so consecutive threads write consecutive
// addresses; with channel-last phase tensors they also read consecutive addresses. Grid-stride loop, int64
// indexing, no atomics. The output index splits into (n, c, oy, ox) and each of oy + pad_h, ox + pad_w into
// (row of the phase, phase) by 32-bit multiply-shift division (IntDivider<uint32_t>) when the output has < 2^31
// elements, by int64 division otherwise: the same arithmetic as phase_value. The bias is read in the accumulation
// dtype (converted on the host, as the CPU kernel does), so a float32 bias beside bfloat16 tensors reads right.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"
#include "fastcnn/cuda_index.cuh"

#include <algorithm>

namespace fastcnn {
namespace {

constexpr int kThreads = 256;

// Dividers of the output's three fastest coordinates in memory order ((C, OW, OH) or (OW, OH, C)) and of the strides.
template <typename index_t>
struct StoreDividers {
  IntDivider<index_t> d0, d1, d2, stride_h, stride_w;
};

// phase_value (fastcnn/conv_transpose.h) with the divisions by the strides done by the dividers.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t phase_value_div(const PhaseTable<scalar_t>& table, const StoreDividers<index_t>& dv,
                                                 int64_t n, int64_t co, index_t oy, index_t ox) {
  const auto qy = dv.stride_h.divmod(oy + static_cast<index_t>(table.pad_h));
  const auto qx = dv.stride_w.divmod(ox + static_cast<index_t>(table.pad_w));
  const int64_t phase = static_cast<int64_t>(qy.mod) * table.stride_w + static_cast<int64_t>(qx.mod);
  const int64_t t = qy.div, u = qx.div;
  const scalar_t* p = table.data[phase];
  if (p == nullptr || t >= table.len_h[phase] || u >= table.len_w[phase]) return acc_t(0);
  const int64_t* s = table.strides[phase];
  return static_cast<acc_t>(p[n * s[0] + co * s[1] + t * s[2] + u * s[3]]);
}

template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    phase_store_kernel(const PhaseTable<scalar_t> table, const at::opmath_type<scalar_t>* __restrict__ bias,
                       scalar_t* __restrict__ out, int64_t total, StoreDividers<index_t> dv, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const auto q0 = dv.d0.divmod(static_cast<index_t>(i)), q1 = dv.d1.divmod(q0.div), q2 = dv.d2.divmod(q1.div);
    index_t c, ox, oy;
    if (kChannelsLast) {
      c = q0.mod, ox = q1.mod, oy = q2.mod;
    } else {
      ox = q0.mod, oy = q1.mod, c = q2.mod;
    }
    const int64_t n = q2.div;
    const acc_t b = bias == nullptr ? acc_t(0) : bias[c];
    out[i] = bias_act<scalar_t>(phase_value_div<scalar_t, acc_t, index_t>(table, dv, n, c, oy, ox), b, relu);
  }
}

}  // namespace

void phase_store_bias_act_cuda(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                               std::array<int64_t, 2> stride, std::array<int64_t, 2> padding, bool relu) {
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor b = bias.defined() ? bias.to(at::toOpMathType(out.scalar_type())).contiguous() : bias;
  const bool channels_last = memory_format_of(out) == at::MemoryFormat::ChannelsLast;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads,
                                           int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "phase_store_bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto table = make_phase_table<scalar_t>(phases, stride, padding);
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    const int64_t C = out.size(1), OH = out.size(2), OW = out.size(3);
    // Every index formed (flat output index, oy + pad_h, ox + pad_w) below the limit: the 32-bit dividers.
    const int64_t max_index = std::max({out.numel(), OH + padding[0], OW + padding[1]});
    with_index_type(max_index, [&](auto index) {
      using index_t = decltype(index);
      const StoreDividers<index_t> dv{
          divider<index_t>(channels_last ? C : OW), divider<index_t>(channels_last ? OW : OH),
          divider<index_t>(channels_last ? OH : C), divider<index_t>(stride[0]), divider<index_t>(stride[1])};
      const auto kernel = channels_last ? phase_store_kernel<scalar_t, true, index_t>
                                        : phase_store_kernel<scalar_t, false, index_t>;
      kernel<<<blocks, kThreads, 0, stream>>>(table, bp, out.mutable_data_ptr<scalar_t>(), out.numel(), dv, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastcnn
