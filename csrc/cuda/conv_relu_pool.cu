// CUDA kernels of the fused epilogue; cpu/conv_relu_pool.cpp is the behavioural model (same checks, outputs, memory
// formats, numerics). Forward: optional per-channel scale, bias, ReLU and pool in one pass over the convolution
// output. Backward: the gradient at conv * scale + bias gathered per element from the windows containing it, and
// grad_bias as a per-channel reduction over the pooled tensors.
//
// Numerics: values are rounded to scalar_t after the (scale and) bias (like eager's separate add_; scale and bias are
// read in opmath, converted on the host), the max follows PyTorch's
// rule (max_update), the ReLU mask is relu_passes, sums accumulate in at::opmath_type. Each output element is written
// by one thread and every reduction has a fixed, shape-determined order: no atomics, deterministic. out, code and
// grad_conv match the CPU bit for bit (with a scale other than 1, up to the compilers' contraction of x * s + b into
// one fused multiply-add); grad_bias adds in another order than the CPU's serial loop (equal to rounding).
//
// Layouts. NHWC (channels_last, the fast path): a thread owns V consecutive channels of a pixel, V * sizeof(scalar_t)
// <= 16 bytes, the widest V dividing C with every pointer aligned (picked on the host), so a warp reads each window
// row as contiguous 16-byte vectors. NCHW: a thread owns a pixel, consecutive threads consecutive pixels of a row.
// Indexing: grid-stride loops count in int64; the flat index is split into coordinates by multiply-shift division
// (IntDivider<uint32_t>) when every tensor touched has < 2^31 elements, by int64 division otherwise.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastcnn/bias_relu_pool.h"
#include "fastcnn/checks.h"
#include "fastcnn/cuda_epilogue.cuh"
#include "fastcnn/cuda_index.cuh"  // with_index_type

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace fastcnn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSplits = 256;  // most blocks sharing one channel's grad_bias sum

#define GRID_STRIDE_LOOP(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Forward: one pooled element per thread (V lanes), its window read row-major; pool="none" runs as a max over a 1x1
// window of stride 1 (the first element is always taken) with no code. NHWC lanes are V consecutive channels, t
// enumerates (n, ph, pw, channel group) and d0..d2 = C/V, PW, PH. NCHW lanes are V consecutive pw of a row, which the
// host allows only for a one-column window of column stride 1 (lane k's window is lane 0's shifted by k); t
// enumerates (n, c, ph, pw group) and d0..d2 = PW/V, PH, C. Either way out and code sit at t * V.
template <typename scalar_t, int V, bool CL, typename index_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ conv, const at::opmath_type<scalar_t>* __restrict__ scale,
                   const at::opmath_type<scalar_t>* __restrict__ bias, scalar_t* __restrict__ out,
                   uint8_t* __restrict__ code, PoolMode mode, PoolWindow win, int64_t items, Split<index_t> split,
                   index_t C, index_t H, index_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int kh = static_cast<int>(win.kh), kw = static_cast<int>(win.kw);
  const index_t sh = static_cast<index_t>(win.sh), sw = static_cast<index_t>(win.sw);
  const index_t row = CL ? W * C : W, col = CL ? C : 1;  // conv offsets one window row / column on
  const acc_t area = static_cast<acc_t>(win.area());
  const bool is_avg = mode == PoolMode::Avg;
  GRID_STRIDE_LOOP(i, items) {
    const index_t t = static_cast<index_t>(i);
    const auto q0 = split.d0.divmod(t), q1 = split.d1.divmod(q0.div);
    index_t first;  // conv offset of lane 0's first window element
    acc_t s[V], b[V], res[V];
    uint8_t sel[V];
    if constexpr (CL) {
      const auto q2 = split.d2.divmod(q1.div);
      first = ((q2.div * H + q2.mod * sh) * W + q1.mod * sw) * C + q0.mod * V;
      load_channels<V>(scale, q0.mod * V, acc_t(1), s);
      load_channels<V>(bias, q0.mod * V, acc_t(0), b);
    } else {
      first = (q1.div * H + q1.mod * sh) * W + q0.mod * V * sw;
      const index_t c = split.d2.mod(q1.div);
      load_channels<1>(scale, c, acc_t(1), s);
      load_channels<1>(bias, c, acc_t(0), b);
      for (int k = 1; k < V; ++k) {
        s[k] = s[0];
        b[k] = b[0];
      }
    }
    for (int k = 0; k < V; ++k) {
      // Max: the running best starts below every ReLU output (>= 0 or NaN), so the first window element is always
      // taken, as in the CPU kernel's start from it. Avg: res is the sum, sel the bit field of passing ReLUs.
      res[k] = is_avg ? acc_t(0) : acc_t(-1);
      sel[k] = 0;
    }
    for (int wi = 0; wi < kh; ++wi) {
      for (int wj = 0; wj < kw; ++wj) {
        const Vec<scalar_t, V> x = load<V>(conv + first + wi * row + wj * col);
        const auto offset = static_cast<uint8_t>(wi * kw + wj);
        for (int k = 0; k < V; ++k) {
          const acc_t v = affine_relu(x.v[k], s[k], b[k]);
          if (is_avg) {
            res[k] += v;
            sel[k] |= static_cast<uint8_t>(relu_passes(v) << offset);
          } else {
            max_update(v, offset, res[k], sel[k]);
          }
        }
      }
    }
    Vec<scalar_t, V> y;
    Vec<uint8_t, V> z;
    for (int k = 0; k < V; ++k) {
      y.v[k] = static_cast<scalar_t>(is_avg ? res[k] / area : res[k]);
      z.v[k] = sel[k];
    }
    store<V>(out + t * V, y);
    if (code != nullptr) store<V>(code + t * V, z);
  }
}

// pool="none" backward: grad_conv = grad_out where relu_passes(out), else 0; the three share one shape and layout.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    relu_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                         scalar_t* __restrict__ grad_conv, int64_t vectors) {
  using acc_t = at::opmath_type<scalar_t>;
  GRID_STRIDE_LOOP(i, vectors) {
    const Vec<scalar_t, V> g = load<V>(grad_out + i * V), y = load<V>(out + i * V);
    Vec<scalar_t, V> d;
    for (int k = 0; k < V; ++k) d.v[k] = relu_passes(static_cast<acc_t>(y.v[k])) ? g.v[k] : scalar_t(0);
    store<V>(grad_conv + i * V, d);
  }
}

// Max/avg backward: one conv element (V channel lanes in NHWC) per thread, summing the pooled gradients of every
// window containing it that routes to it: max where its code is this offset and the ReLU passes, avg where its bit
// is set (then times 1/area). NHWC: t enumerates (n, h, w, channel group), d0..d2 = C/V, W, H. NCHW (V = 1): t
// enumerates (n, c, h, w), d0..d1 = W, H, d2 unused. grad_conv sits at t * V.
template <typename scalar_t, int V, bool CL, typename index_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                    const uint8_t* __restrict__ code, scalar_t* __restrict__ grad_conv, PoolMode mode,
                    PoolWindow win, int64_t items, Split<index_t> split, index_t C, index_t PH, index_t PW) {
  static_assert(CL || V == 1, "NCHW lanes are single pixels");
  using acc_t = at::opmath_type<scalar_t>;
  const int kw = static_cast<int>(win.kw);
  const index_t sh = static_cast<index_t>(win.sh), sw = static_cast<index_t>(win.sw);
  const index_t row = CL ? PW * C : PW, col = CL ? C : 1;  // pooled offsets one row / column on
  const acc_t area = static_cast<acc_t>(win.area());
  const bool is_max = mode == PoolMode::Max;
  GRID_STRIDE_LOOP(i, items) {
    const index_t t = static_cast<index_t>(i);
    const auto q0 = split.d0.divmod(t), q1 = split.d1.divmod(q0.div);
    index_t h, w, base;  // conv position; pooled offset of lane 0's (n, c, 0, 0)
    if constexpr (CL) {
      const auto q2 = split.d2.divmod(q1.div);
      h = q2.mod, w = q1.mod, base = q2.div * PH * PW * C + q0.mod * V;
    } else {
      h = q1.mod, w = q0.mod, base = q1.div * PH * PW;
    }
    int64_t ph0, ph1, pw0, pw1;
    windows_along(h, win.kh, win.sh, PH, ph0, ph1);
    windows_along(w, win.kw, win.sw, PW, pw0, pw1);
    acc_t sum[V];
    for (int k = 0; k < V; ++k) sum[k] = acc_t(0);
    for (index_t ph = static_cast<index_t>(ph0); ph <= ph1; ++ph) {
      for (index_t pw = static_cast<index_t>(pw0); pw <= pw1; ++pw) {
        const index_t at = base + ph * row + pw * col;
        const int offset = static_cast<int>(h - ph * sh) * kw + static_cast<int>(w - pw * sw);
        const Vec<uint8_t, V> z = load<V>(code + at);
        bool hit[V], any = false;
        for (int k = 0; k < V; ++k) {
          hit[k] = is_max ? z.v[k] == offset : ((z.v[k] >> offset) & 1) != 0;
          any |= hit[k];
        }
        if (!any) continue;  // spares the gradient loads where the window routes elsewhere
        const Vec<scalar_t, V> g = load<V>(grad_out + at);
        const Vec<scalar_t, V> y = is_max ? load<V>(out + at) : g;
        for (int k = 0; k < V; ++k) {
          if (hit[k] && (!is_max || relu_passes(static_cast<acc_t>(y.v[k])))) sum[k] += static_cast<acc_t>(g.v[k]);
        }
      }
    }
    Vec<scalar_t, V> d;
    for (int k = 0; k < V; ++k) d.v[k] = static_cast<scalar_t>(is_max ? sum[k] : sum[k] / area);
    store<V>(grad_conv + t * V, d);
  }
}

// dL/dbias contribution of pooled element i, before avg's 1/area: max and none route the whole gradient where the
// ReLU passes (code == nullptr); an avg window routes grad / area to each of its popcount(code) passing elements.
template <typename acc_t, typename scalar_t, typename index_t>
__device__ __forceinline__ acc_t bias_term(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                           const uint8_t* __restrict__ code, index_t i) {
  if (code != nullptr) return static_cast<acc_t>(grad_out[i]) * static_cast<acc_t>(__popc(code[i]));
  return relu_passes(static_cast<acc_t>(out[i])) ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
}

// Fixed-order tree sum over k of s[k * lanes + lane] (count a power of two), the calling thread being slot
// tid = k * lanes + lane; leaves the sums in s[lane].
template <typename acc_t>
__device__ __forceinline__ void tree_sum(acc_t* s, int tid, int k, int count, int lanes) {
  for (int half = count / 2; half > 0; half /= 2) {
    __syncthreads();
    if (k < half) s[tid] += s[tid + half * lanes];
  }
  __syncthreads();
}

// NHWC grad_bias, stage 1: rows (n, ph, pw) of C contiguous channels. Lane x owns channel blockIdx.x * blockDim.x + x
// (a warp reads whole rows: coalesced); the block's y threads stride over the rows of split blockIdx.y.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    bias_grad_nhwc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                          const uint8_t* __restrict__ code, int64_t rows, int64_t C, int64_t rows_per_split,
                          acc_t* __restrict__ partial) {
  __shared__ acc_t s[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split, r1 = std::min(rows, r0 + rows_per_split);
  acc_t sum = 0;
  for (int64_t r = r0 + threadIdx.y; c < C && r < r1; r += blockDim.y) {
    sum += bias_term<acc_t>(grad_out, out, code, r * C + c);
  }
  s[tid] = sum;
  tree_sum(s, tid, threadIdx.y, blockDim.y, blockDim.x);
  if (threadIdx.y == 0 && c < C) partial[blockIdx.y * C + c] = s[threadIdx.x];
}

// NCHW grad_bias, stage 1: channel blockIdx.x is N planes of S contiguous elements, read as one flat range
// e = n * S + s; block (c, split) sums [split * chunk, (split + 1) * chunk), consecutive threads consecutive e.
template <typename scalar_t, typename index_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    bias_grad_nchw_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                          const uint8_t* __restrict__ code, index_t C, IntDivider<index_t> plane, index_t len,
                          index_t chunk, acc_t* __restrict__ partial) {
  __shared__ acc_t s[kThreads];
  const index_t c = blockIdx.x, e0 = blockIdx.y * chunk, e1 = e0 + chunk < len ? e0 + chunk : len;
  acc_t sum = 0;
  for (index_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const auto q = plane.divmod(e);  // (n, s)
    sum += bias_term<acc_t>(grad_out, out, code, (q.div * C + c) * plane.divisor + q.mod);
  }
  s[threadIdx.x] = sum;
  tree_sum(s, threadIdx.x, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) partial[int64_t(blockIdx.y) * C + c] = s[0];
}

// grad_bias, stage 2: grad_bias[c] = (partial[0][c] + partial[1][c] + ..., in split order) / divisor.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) bias_grad_finalize_kernel(const acc_t* __restrict__ partial,
                                                                     int64_t splits, int64_t C, acc_t divisor,
                                                                     scalar_t* __restrict__ grad_bias) {
  GRID_STRIDE_LOOP(c, C) {
    acc_t sum = 0;
    for (int64_t j = 0; j < splits; ++j) sum += partial[j * C + c];
    grad_bias[c] = static_cast<scalar_t>(sum / divisor);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Enough blocks to fill the device once; the grid-stride loops cover the rest.
unsigned int grid_for(int64_t items) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = int64_t(prop->multiProcessorCount) * prop->maxThreadsPerMultiProcessor / kThreads;
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(items, kThreads), 1, resident));
}

template <typename index_t>
Split<index_t> split_of(int64_t d0, int64_t d1, int64_t d2) {
  return {IntDivider<index_t>(static_cast<index_t>(d0)), IntDivider<index_t>(static_cast<index_t>(d1)),
          IntDivider<index_t>(static_cast<index_t>(d2))};
}

// Widest V (elements, V * sizeof(scalar_t) <= 16 bytes) dividing `extent` with the data of every tensor given
// (null or undefined ones skipped) aligned to V of its elements.
template <typename scalar_t>
int vec_width(int64_t extent, std::initializer_list<const at::Tensor*> tensors) {
  const auto aligned = [&](int v) {
    return std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor* t) {
      return t == nullptr || !t->defined() ||
             reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (v * t->element_size()) == 0;
    });
  };
  int v = static_cast<int>(16 / sizeof(scalar_t));
  while (v > 1 && (extent % v != 0 || !aligned(v))) v /= 2;
  return v;
}

// Calls f(std::integral_constant<int, v>{}), instantiating only the widths that fit 16 bytes of scalar_t.
template <typename scalar_t, typename F>
void with_vec(int v, const F& f) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (v == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (sizeof(scalar_t) <= 4) {
    if (v == 4) return f(std::integral_constant<int, 4>{});
  }
  if (v == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

template <typename scalar_t>
void launch_forward(const at::Tensor& conv, const at::Tensor& scale, const at::Tensor& bias, PoolMode mode,
                    const PoolWindow& pool_win, bool cl, at::Tensor& out, at::Tensor& code) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = conv.size(1), H = conv.size(2), W = conv.size(3), PH = out.size(2), PW = out.size(3);
  const bool none = mode == PoolMode::None;
  const PoolWindow win = none ? PoolWindow{1, 1, 1, 1} : pool_win;
  const at::Tensor* code_t = none ? nullptr : &code;
  const int v = cl ? vec_width<scalar_t>(C, {&conv, &out, code_t, &scale, &bias})
                   : (win.kw == 1 && win.sw == 1 ? vec_width<scalar_t>(W, {&conv, &out, code_t}) : 1);
  with_index_type(conv.numel(), [&](auto index) {
    using index_t = decltype(index);
    with_vec<scalar_t>(v, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const int64_t items = out.numel() / V;
      const auto kernel =
          cl ? forward_kernel<scalar_t, V, true, index_t> : forward_kernel<scalar_t, V, false, index_t>;
      kernel<<<grid_for(items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          conv.const_data_ptr<scalar_t>(), scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
          none ? nullptr : code.mutable_data_ptr<uint8_t>(), mode, win, items,
          cl ? split_of<index_t>(C / V, PW, PH) : split_of<index_t>(PW / V, PH, C), static_cast<index_t>(C),
          static_cast<index_t>(H), static_cast<index_t>(W));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename scalar_t>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                     const PoolWindow& win, bool cl, at::Tensor& grad_conv) {
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  scalar_t* dst = grad_conv.mutable_data_ptr<scalar_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (mode == PoolMode::None) {
    with_vec<scalar_t>(vec_width<scalar_t>(out.numel(), {&grad_out, &out, &grad_conv}), [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const int64_t vectors = out.numel() / V;
      relu_backward_kernel<scalar_t, V><<<grid_for(vectors), kThreads, 0, stream>>>(g, y, dst, vectors);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t C = grad_conv.size(1), H = grad_conv.size(2), W = grad_conv.size(3);
  const int64_t PH = out.size(2), PW = out.size(3);
  with_index_type(std::max(grad_conv.numel(), out.numel()), [&](auto index) {
    using index_t = decltype(index);
    const auto launch = [&](auto kernel, int64_t items, const Split<index_t>& split) {
      kernel<<<grid_for(items), kThreads, 0, stream>>>(g, y, code.const_data_ptr<uint8_t>(), dst, mode, win, items,
                                                       split, static_cast<index_t>(C), static_cast<index_t>(PH),
                                                       static_cast<index_t>(PW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!cl) {
      return launch(backward_kernel<scalar_t, 1, false, index_t>, grad_conv.numel(), split_of<index_t>(W, H, 1));
    }
    with_vec<scalar_t>(vec_width<scalar_t>(C, {&grad_out, &out, &code, &grad_conv}), [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      launch(backward_kernel<scalar_t, V, true, index_t>, grad_conv.numel() / V, split_of<index_t>(C / V, W, H));
    });
  });
}

// grad_bias over non-empty pooled tensors: stage 1 writes partial[split][c] in opmath, stage 2 adds them in order.
// Split counts depend on the shape alone (~16 elements per thread, at most kMaxSplits), so the summation order, hence
// the result, is the same on every run and every device.
template <typename scalar_t>
void launch_bias_grad(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                      const PoolWindow& win, bool cl, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  const uint8_t* codes = mode == PoolMode::Avg ? code.const_data_ptr<uint8_t>() : nullptr;
  const int64_t C = grad_out.size(1), S = grad_out.size(2) * grad_out.size(3), len = grad_out.size(0) * S;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // NHWC blocks are tx channel lanes by ty row threads, tx = C rounded up to a power of two, at most a warp, so a
  // small C still fills the warp with whole rows. NCHW blocks are one channel's kThreads lanes along the plane.
  int64_t tx = 1;
  while (cl && tx < std::min<int64_t>(C, 32)) tx *= 2;
  const int64_t per_block = 16 * (cl ? kThreads / tx : kThreads);  // rows (NHWC) or elements (NCHW) per split
  const int64_t splits = std::clamp<int64_t>(ceil_div(len, per_block), 1, kMaxSplits), chunk = ceil_div(len, splits);
  at::Tensor partial = at::empty({splits, C}, grad_out.options().dtype(at::toOpMathType(grad_out.scalar_type())));
  const dim3 grid(static_cast<unsigned int>(ceil_div(C, tx)), static_cast<unsigned int>(splits));
  if (cl) {
    const dim3 block(static_cast<unsigned int>(tx), static_cast<unsigned int>(kThreads / tx));
    bias_grad_nhwc_kernel<scalar_t>
        <<<grid, block, 0, stream>>>(g, y, codes, len, C, chunk, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    with_index_type(grad_out.numel(), [&](auto index) {
      using index_t = decltype(index);
      bias_grad_nchw_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
          g, y, codes, static_cast<index_t>(C), IntDivider<index_t>(static_cast<index_t>(S)),
          static_cast<index_t>(len), static_cast<index_t>(chunk), partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const acc_t divisor = mode == PoolMode::Avg ? static_cast<acc_t>(win.area()) : acc_t(1);
  bias_grad_finalize_kernel<scalar_t><<<grid_for(C), kThreads, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), splits, C, divisor, grad_bias.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A per-channel vector converted to opmath (contiguous), or an undefined tensor when absent.
at::Tensor opmath_vector(const c10::optional<at::Tensor>& t, const at::Tensor& conv) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(at::toOpMathType(conv.scalar_type())).contiguous();
}

std::tuple<at::Tensor, at::Tensor> bias_relu_pool_cuda(const at::Tensor& conv_in,
                                                       const c10::optional<at::Tensor>& bias_in, c10::string_view pool,
                                                       at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                                                       const c10::optional<at::Tensor>& scale_in) {
  const c10::cuda::CUDAGuard guard(conv_in.device());
  EpilogueForward f = prepare_epilogue_forward(conv_in, bias_in, pool, pool_size, pool_stride, scale_in);
  const at::Tensor scale = opmath_vector(scale_in, f.conv), bias = opmath_vector(bias_in, f.conv);
  if (f.out.numel() == 0) return {f.out, f.code};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.conv.scalar_type(), "bias_relu_pool_cuda", [&] {
    launch_forward<scalar_t>(f.conv, scale, bias, f.mode, f.win, f.fmt == at::MemoryFormat::ChannelsLast, f.out,
                             f.code);
  });
  return {f.out, f.code};
}

// With a scale (z = conv * scale + bias): grad_conv = scale * dz rounded once, grad_scale = sum dz * conv in opmath.
// Applied here with ATen ops after the gather kernel; the CPU does both in its gradient pass.
void apply_scale(EpilogueBackward& b) {
  const at::ScalarType acc = at::toOpMathType(b.grad_conv.scalar_type());
  const at::Tensor dz = b.grad_conv.to(acc);
  if (b.conv.defined()) b.grad_scale.copy_((dz * b.conv.to(acc)).sum({0, 2, 3}));
  b.grad_conv.copy_(dz * b.scale.view({1, -1, 1, 1}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_relu_pool_backward_scaled_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& code_in, c10::SymIntArrayRef conv_size,
    c10::string_view pool, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool bias_grad,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& conv) {
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  EpilogueBackward b = prepare_epilogue_backward(grad_out_in, out_in, code_in, conv_size, pool, pool_size,
                                                 pool_stride, bias_grad, scale, conv);
  const bool cl = b.fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.out.scalar_type(), "bias_relu_pool_backward_cuda", [&] {
    if (b.grad_conv.numel() > 0) launch_backward<scalar_t>(b.grad_out, b.out, b.code, b.mode, b.win, cl, b.grad_conv);
    if (b.grad_bias.numel() > 0 && b.out.numel() > 0) {
      launch_bias_grad<scalar_t>(b.grad_out, b.out, b.code, b.mode, b.win, cl, b.grad_bias);
    }
  });
  // With no pooled element every channel's sum is empty: zero, as the CPU's loop gives.
  if (b.grad_bias.numel() > 0 && b.out.numel() == 0) b.grad_bias.zero_();
  if (b.scale.defined()) apply_scale(b);
  return {b.grad_conv, b.grad_bias, b.grad_scale.defined() ? b.grad_scale : b.out.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("bias_relu_pool", &bias_relu_pool_cuda);
  m.impl("bias_relu_pool_backward", &unscaled_backward<&bias_relu_pool_backward_scaled_cuda>);
  m.impl("bias_relu_pool_scaled_backward", &bias_relu_pool_backward_scaled_cuda);
}

}  // namespace fastcnn
