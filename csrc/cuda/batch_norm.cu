// CUDA kernels of the fused BatchNorm pieces; cpu/batch_norm.cpp is the behavioural model (same checks, outputs,
// memory formats) and fastcnn/reference/batch_norm.py has the math.
//
// Per-channel reductions (statistics; the backward's sum dz and sum dz (x - mean)) run in two kernels with no
// atomics: a partial kernel where block (channel tile, split) reduces a fixed, shape-determined range of the
// channel's M = N*H*W elements (per-thread Welford / sums, then a fixed-order shared-memory tree), and a finalize
// kernel that merges the splits of each channel in order. Results are deterministic and independent of the GPU.
//   NCHW: a block owns one channel; its threads stride over the split's elements (consecutive threads read
//         consecutive pixels of a plane).
//   NHWC: a block is 32 channels x 8 pixel rows; a warp reads 32 consecutive channels of one pixel.
// Elementwise kernels (apply; the backward's grad_input = a (dz - b (x - mean) - d)) use grid-stride loops with int64
// indices. Index math: the channel of an element (and the NCHW reduction's plane offset) comes from 32-bit
// multiply-shift division (IntDivider<uint32_t>, fastcnn/cuda_index.cuh) when the tensor has < 2^31 elements, from
// int64 division otherwise. A tensor with no element (C = 0: an empty branch of an Inception block) launches nothing.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastcnn/batch_norm.h"
#include "fastcnn/cuda_index.cuh"

#include <algorithm>

namespace fastcnn {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32, kTileRows = 8;  // NHWC partial-kernel block: channels x rows
constexpr int64_t kElemsPerSplit = 8192;   // target elements of one channel per partial block
constexpr int64_t kMaxSplits = 256;

#define GRID_STRIDE_LOOP(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Welford moments, merged with Chan et al.'s formula (count kept in acc_t: exact below 2^24 per partial in fp32,
// and a relative error of 2^-24 beyond, far below the statistics' own rounding).
template <typename acc_t>
struct Moments {
  acc_t count, mean, m2;
  __device__ void init() { count = mean = m2 = acc_t(0); }
  __device__ void add(acc_t x) {
    count += acc_t(1);
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }
  __device__ void merge(const Moments& b) {
    if (b.count == acc_t(0)) return;
    const acc_t n = count + b.count, delta = b.mean - mean;
    mean += delta * (b.count / n);
    m2 += b.m2 + delta * delta * (count * b.count / n);
    count = n;
  }
  __device__ void store(acc_t* mean_out, acc_t* var_out, int64_t c) const {
    mean_out[c] = mean;
    var_out[c] = m2 / count;
  }
};

// (sum dz, sum dz (x - mean)) of the backward.
template <typename acc_t>
struct GradSums {
  acc_t dz, dz_xmu;
  __device__ void init() { dz = dz_xmu = acc_t(0); }
  __device__ void merge(const GradSums& b) {
    dz += b.dz;
    dz_xmu += b.dz_xmu;
  }
  __device__ void store(acc_t* dz_out, acc_t* dz_xmu_out, int64_t c) const {
    dz_out[c] = dz;
    dz_xmu_out[c] = dz_xmu;
  }
};

struct Geometry {
  bool channels_last;
  int64_t N, C, HW, splits, per_split;  // per_split: elements (NCHW) or pixel rows (NHWC) of one split
};

Geometry geometry(const BnLayout& L) {
  const int64_t m = L.N * L.HW;
  const int64_t splits = std::min(kMaxSplits, std::max<int64_t>(1, m / kElemsPerSplit));
  return {L.channels_last, L.N, L.C, L.HW, splits, (m + splits - 1) / splits};
}

// Offset of element m (0 <= m < N*HW) of channel c; hw divides by HW (offsets below N*C*HW fit index_t).
template <typename index_t>
__device__ __forceinline__ int64_t offset_of(const Geometry& g, const IntDivider<index_t>& hw, int64_t c, int64_t m) {
  if (g.channels_last) return m * g.C + c;
  const auto q = hw.divmod(static_cast<index_t>(m));  // (n, pixel)
  return static_cast<int64_t>((q.div * static_cast<index_t>(g.C) + static_cast<index_t>(c)) * hw.divisor + q.mod);
}

// Partial reduction: visit(acc, offset) for every element of the block's (channel, split), then a fixed-order tree
// over the block's threads; partial[split * C + c] receives the result.
template <typename Acc, typename index_t, typename Visit>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(Geometry g, IntDivider<index_t> hw, Visit visit, Acc* __restrict__ partial) {
  __shared__ Acc shared[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t m0 = split * g.per_split, total = g.N * g.HW;
  const int64_t m1 = m0 + g.per_split < total ? m0 + g.per_split : total;
  int64_t c;
  int lane, lanes;  // this thread's position among the threads sharing channel c
  if (g.channels_last) {
    c = int64_t(blockIdx.x) * kTileC + threadIdx.x;
    lane = threadIdx.y;
    lanes = kTileRows;
  } else {
    c = blockIdx.x;
    lane = tid;
    lanes = kThreads;
  }
  Acc acc;
  acc.init();
  if (c < g.C) {
    for (int64_t m = m0 + lane; m < m1; m += lanes) visit(acc, offset_of(g, hw, c, m), c);
  }
  shared[tid] = acc;
  __syncthreads();
  // Tree over the lanes of one channel: NHWC lanes are threadIdx.y (stride kTileC in shared), NCHW lanes all threads.
  const int stride = g.channels_last ? kTileC : 1;
  for (int half = lanes / 2; half > 0; half /= 2) {
    if (lane < half) shared[tid].merge(shared[tid + half * stride]);
    __syncthreads();
  }
  if (lane == 0 && c < g.C) partial[split * g.C + c] = shared[tid];
}

template <typename scalar_t, typename acc_t>
struct StatsVisit {
  const scalar_t* __restrict__ x;
  __device__ void operator()(Moments<acc_t>& acc, int64_t off, int64_t) const {
    acc.add(static_cast<acc_t>(x[off]));
  }
};

// dz: grad_out unless the gate (saved mask or recomputed activation) is <= 0, as ReLU's backward passes it.
template <typename scalar_t, typename gate_t, typename acc_t>
__device__ __forceinline__ acc_t gated(const scalar_t* __restrict__ g, const gate_t* __restrict__ gate, int64_t i) {
  return static_cast<acc_t>(gate[i]) <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(g[i]);
}

template <typename scalar_t, typename gate_t, typename acc_t>
struct ReduceVisit {
  const scalar_t* __restrict__ grad_out;
  const gate_t* __restrict__ gate;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean;  // null: 0
  __device__ void operator()(GradSums<acc_t>& acc, int64_t off, int64_t c) const {
    const acc_t dz = gated<scalar_t, gate_t, acc_t>(grad_out, gate, off);
    acc.dz += dz;
    acc.dz_xmu += dz * (static_cast<acc_t>(x[off]) - (mean ? mean[c] : acc_t(0)));
  }
};

// Merges the splits of each channel in order; Acc::store writes the channel's two results (Moments: mean and biased
// variance; GradSums: sum dz and sum dz (x - mean)).
template <typename Acc, typename acc_t>
__global__ void finalize_kernel(const Acc* __restrict__ partial, int64_t splits, int64_t C, acc_t* __restrict__ out0,
                                acc_t* __restrict__ out1) {
  GRID_STRIDE_LOOP(c, C) {
    Acc total = partial[c];
    for (int64_t s = 1; s < splits; ++s) total.merge(partial[s * C + c]);
    total.store(out0, out1, c);
  }
}

template <typename Acc, typename Visit>
at::Tensor launch_partial(const Geometry& g, const Visit& visit, const at::Tensor& like) {
  at::Tensor partial = at::empty({g.splits * g.C * int64_t(sizeof(Acc))}, like.options().dtype(at::kByte));
  const dim3 block = g.channels_last ? dim3(kTileC, kTileRows) : dim3(kThreads);
  const dim3 grid(g.channels_last ? (g.C + kTileC - 1) / kTileC : g.C, g.splits);
  with_index_type(g.N * g.C * g.HW, [&](auto index) {
    using index_t = decltype(index);
    partial_kernel<Acc, index_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, divider<index_t>(g.HW), visit, reinterpret_cast<Acc*>(partial.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

// The channel of element i: i mod C (NHWC) or (i div HW) mod C (NCHW).
template <typename index_t>
struct ChannelOf {
  IntDivider<index_t> C, HW;
  bool channels_last;
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    const index_t j = static_cast<index_t>(i);
    return static_cast<int64_t>(channels_last ? C.mod(j) : C.mod(HW.div(j)));
  }
};

template <typename index_t>
ChannelOf<index_t> channel_of(const BnLayout& L) {
  return {divider<index_t>(L.C), divider<index_t>(L.HW), L.channels_last};
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                 const scalar_t* __restrict__ residual, scalar_t* __restrict__ out, uint8_t* __restrict__ mask,
                 int64_t n, ChannelOf<index_t> channel_of) {
  GRID_STRIDE_LOOP(i, n) {
    const int64_t c = channel_of(i);
    acc_t v = static_cast<acc_t>(x[i]) * (scale ? scale[c] : acc_t(1)) + shift[c];
    if (residual) v += static_cast<acc_t>(residual[i]);
    const scalar_t o = static_cast<scalar_t>(v <= acc_t(0) ? acc_t(0) : v);  // NaN propagates
    out[i] = o;
    if (mask) mask[i] = !(static_cast<acc_t>(o) <= acc_t(0));
  }
}

template <typename scalar_t, typename gate_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    elemt_kernel(const scalar_t* __restrict__ grad_out, const gate_t* __restrict__ gate,
                 const scalar_t* __restrict__ x, const acc_t* __restrict__ mean, const acc_t* __restrict__ a,
                 const acc_t* __restrict__ b, const acc_t* __restrict__ d, scalar_t* __restrict__ grad,
                 scalar_t* __restrict__ dz_out, int64_t n, ChannelOf<index_t> channel_of) {
  GRID_STRIDE_LOOP(i, n) {
    const int64_t c = channel_of(i);
    const acc_t dz = gated<scalar_t, gate_t, acc_t>(grad_out, gate, i);
    acc_t v = dz;
    if (b) v -= b[c] * (static_cast<acc_t>(x[i]) - (mean ? mean[c] : acc_t(0)));
    if (d) v -= d[c];
    grad[i] = static_cast<scalar_t>(a[c] * v);
    if (dz_out) dz_out[i] = static_cast<scalar_t>(dz);
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

void batch_norm_stats_cuda(const BnLayout& L, const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry(L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor partial =
        launch_partial<Moments<acc_t>>(g, StatsVisit<scalar_t, acc_t>{x.const_data_ptr<scalar_t>()}, x);
    finalize_kernel<<<blocks_for(L.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const Moments<acc_t>*>(partial.const_data_ptr()), g.splits, L.C, mean.data_ptr<acc_t>(),
        var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_shift_add_relu_cuda(ApplyCall& c) {
  const c10::cuda::CUDAGuard guard(c.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.x.scalar_type(), "scale_shift_add_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(c.x.numel(), [&](auto index) {
      using index_t = decltype(index);
      apply_kernel<scalar_t, acc_t, index_t>
          <<<blocks_for(c.x.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              c.x.const_data_ptr<scalar_t>(), ptr_or_null<acc_t>(c.scale), c.shift.const_data_ptr<acc_t>(),
              ptr_or_null<scalar_t>(c.residual), c.out.data_ptr<scalar_t>(),
              c.mask.numel() ? c.mask.data_ptr<uint8_t>() : nullptr, c.x.numel(), channel_of<index_t>(c.L));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// sum dz and sum dz (x - mean) of in into sum_dz and sum_dz_xmu (in's x has an element).
void launch_reduce(const BackwardInputs& in, at::Tensor& sum_dz, at::Tensor& sum_dz_xmu) {
  const Geometry geo = geometry(in.L);
  FASTCNN_DISPATCH_WITH_GATE(in.x, in.gate, "batch_norm_backward_reduce_cuda", {
    using acc_t = at::opmath_type<scalar_t>;
    const ReduceVisit<scalar_t, gate_t, acc_t> visit{in.grad_out.const_data_ptr<scalar_t>(),
                                                     in.gate.const_data_ptr<gate_t>(), in.x.const_data_ptr<scalar_t>(),
                                                     ptr_or_null<acc_t>(in.mean)};
    const at::Tensor partial = launch_partial<GradSums<acc_t>>(geo, visit, in.x);
    finalize_kernel<<<blocks_for(in.L.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const GradSums<acc_t>*>(partial.const_data_ptr()), geo.splits, in.L.C,
        sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_x = a (dz - b (x - mean) - d) and dz (if dz has elements) for in (whose x has an element).
void launch_elemt(const BackwardInputs& in, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                  const c10::optional<at::Tensor>& d, at::Tensor& grad_x, at::Tensor& dz) {
  FASTCNN_DISPATCH_WITH_GATE(in.x, in.gate, "batch_norm_backward_elemt_cuda", {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(in.x.numel(), [&](auto index) {
      using index_t = decltype(index);
      elemt_kernel<scalar_t, gate_t, acc_t, index_t>
          <<<blocks_for(in.x.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              in.grad_out.const_data_ptr<scalar_t>(), in.gate.const_data_ptr<gate_t>(),
              in.x.const_data_ptr<scalar_t>(), ptr_or_null<acc_t>(in.mean), a.const_data_ptr<acc_t>(),
              ptr_or_null<acc_t>(b), ptr_or_null<acc_t>(d), grad_x.data_ptr<scalar_t>(),
              dz.numel() ? dz.data_ptr<scalar_t>() : nullptr, in.x.numel(), channel_of<index_t>(in.L));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                   const at::Tensor& input,
                                                                   const c10::optional<at::Tensor>& mean) {
  const c10::cuda::CUDAGuard guard(input.device());
  ReduceCall c = reduce_call(grad_out, gate, input, mean);
  if (c.in.x.numel() > 0) launch_reduce(c.in, c.sum_dz, c.sum_dz_xmu);
  return {c.sum_dz, c.sum_dz_xmu};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cuda(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input, const c10::optional<at::Tensor>& mean,
    const at::Tensor& a, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& d, bool want_dz) {
  const c10::cuda::CUDAGuard guard(input.device());
  ElemtCall c = elemt_call(grad_out, gate, input, mean, a, b, d, want_dz);
  if (c.in.x.numel() > 0) launch_elemt(c.in, *c.a, c.b, c.d, c.grad_x, c.dz);
  return {c.grad_x, c.dz};
}

// The reduction, the coefficients as the tensor ops of fastcnn/ops/batch_norm/_training.py compute them (the same
// ATen ops on the device, so the same bits), then the elementwise pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool want_dz) {
  const c10::cuda::CUDAGuard guard(input.device());
  BackwardCall c = backward_call(grad_out, gate, input, weight, mean, var, want_dz);
  if (c.in.x.numel() == 0) return {c.grad_x, c.grad_weight.zero_(), c.grad_bias.zero_(), c.dz};
  launch_reduce(c.in, c.grad_bias, c.grad_weight);
  const int64_t count = c.in.L.N * c.in.L.HW;
  const at::Tensor invstd = at::rsqrt(c.var + eps);
  const at::Tensor a = c.weight * invstd, b = invstd * invstd * c.grad_weight / count, d = c.grad_bias / count;
  c.grad_weight.mul_(invstd);
  launch_elemt(c.in, a, b, d, c.grad_x, c.dz);
  return {c.grad_x, c.grad_weight, c.grad_bias, c.dz};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_scale_shift_cuda(const at::Tensor& weight, const at::Tensor& bias,
                                                               const at::Tensor& mean, const at::Tensor& var,
                                                               double eps) {
  check_scale_shift_args(weight, bias, mean, var);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor scale = weight * at::rsqrt(var + eps);
  return {scale, bias - mean * scale};
}

// The tensor ops of the composition (fastcnn/ops/batch_norm/__init__.py) on the device.
void batch_norm_update_running_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                    const at::Tensor& var, double factor, int64_t count) {
  check_running_args(running_mean, running_var, mean, var, count);
  const c10::cuda::CUDAGuard guard(running_mean.device());
  running_mean.mul_(1 - factor).add_(mean * factor);
  running_var.mul_(1 - factor).add_(var * (static_cast<double>(count) / static_cast<double>(count - 1)) * factor);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  FASTCNN_REGISTER_BATCH_NORM_FORWARD_OPS(m, cuda);
  FASTCNN_REGISTER_BATCH_NORM_BACKWARD_OPS(m, cuda);
}

}  // namespace fastcnn
