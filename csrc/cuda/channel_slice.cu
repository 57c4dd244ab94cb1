// CUDA kernel of scale_shift_relu_out: out[n, c, h, w] = relu(input[n, c, h, w] * scale[c] + shift[c]) stored into
// a given 4-D tensor of any strides (a channel slice of a concatenated output); cpu/channel_slice.cpp is the
// behavioural model and fastcnn/reference/channel_slice.py has the math.
//
// One grid-stride loop over the N*C*H*W elements with int64 indices. The linear index is decomposed in out's own
// order - (n, h, w, c) when out's channels are unit-stride (a slice of an NHWC tensor), else (n, c, h, w) - so
// consecutive threads write consecutive addresses of out; both tensors are then addressed through their strides.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastcnn/channel_slice.h"

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

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    store_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                 scalar_t* __restrict__ out, int64_t numel, int64_t C, int64_t H, int64_t W, Strides4 xs,
                 Strides4 os, bool channels_inner) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w, t = i;
    if (channels_inner) {
      c = t % C, t /= C;
      w = t % W, t /= W;
      h = t % H, n = t / H;
    } else {
      w = t % W, t /= W;
      h = t % H, t /= H;
      c = t % C, n = t / C;
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
    store_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), sc.has_value() ? sc->const_data_ptr<acc_t>() : nullptr,
        sh->const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), numel, out.size(1), out.size(2), out.size(3),
        strides_of(input), strides_of(out), channels_innermost(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("scale_shift_relu_out", &scale_shift_relu_out_cuda);
}

}  // namespace fastcnn
