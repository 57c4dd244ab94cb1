// CUDA kernel of scale_shift_relu_out: out[n, c, h, w] = relu(input[n, c, h, w] * scale[c] + shift[c]) stored into
// a given 4-D tensor of any strides (a channel slice of a concatenated output); cpu/channel_slice.cpp is the
// behavioural model and fastcnn/reference/channel_slice.py has the math.
//
// One grid-stride loop over the N*C*H*W elements with int64 indices. The linear index is decomposed in out's own
// order - (n, h, w, c) when out's channels are unit-stride (a slice of an NHWC tensor), else (n, c, h, w) - so
// consecutive threads write consecutive addresses of out; both tensors are then addressed through their (int64)
// strides. The three divisions are 32-bit multiply-shifts (IntDivider<uint32_t>) when N*C*H*W < 2^31, int64 otherwise.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastcnn/channel_slice.h"
#include "fastcnn/cuda_index.cuh"

#include <algorithm>

namespace fastcnn {
namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// d0, d1, d2: the dividers of the three fastest coordinates in out's order: (C, W, H) or (W, H, C).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    store_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                 scalar_t* __restrict__ out, int64_t numel, IntDivider<index_t> d0, IntDivider<index_t> d1,
                 IntDivider<index_t> d2, Strides4 xs, Strides4 os, bool channels_inner) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const auto q0 = d0.divmod(static_cast<index_t>(i)), q1 = d1.divmod(q0.div), q2 = d2.divmod(q1.div);
    int64_t n = q2.div, c, h, w;
    if (channels_inner) {
      c = q0.mod, w = q1.mod, h = q2.mod;
    } else {
      w = q0.mod, h = q1.mod, c = q2.mod;
    }
    const acc_t v = static_cast<acc_t>(x[n * xs.n + c * xs.c + h * xs.h + w * xs.w]) * (scale ? scale[c] : acc_t(1)) +
                    shift[c];
    out[n * os.n + c * os.c + h * os.h + w * os.w] = static_cast<scalar_t>(v <= acc_t(0) ? acc_t(0) : v);
  }
}

void scale_shift_relu_out_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& scale,
                               const at::Tensor& shift, at::Tensor out) {
  check_store_into(input, out);
  const auto sc = optional_per_channel(scale, input, "scale");
  const auto sh = optional_per_channel(shift, input, "shift");
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 1 << 16));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "scale_shift_relu_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool inner = channels_innermost(out);
    const int64_t C = out.size(1), H = out.size(2), W = out.size(3);
    with_index_type(numel, [&](auto index) {
      using index_t = decltype(index);
      store_kernel<scalar_t, acc_t, index_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          input.const_data_ptr<scalar_t>(), sc.has_value() ? sc->const_data_ptr<acc_t>() : nullptr,
          sh->const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), numel, divider<index_t>(inner ? C : W),
          divider<index_t>(inner ? W : H), divider<index_t>(inner ? H : C), strides_of(input), strides_of(out), inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("scale_shift_relu_out", &scale_shift_relu_out_cuda);
}

}  // namespace fastcnn
