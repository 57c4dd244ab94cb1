// Device helpers of the CUDA epilogue kernels (cuda/conv_relu_pool.cu): vector access, index splitting, the
// scale + bias + ReLU step and the pooling-window search specialised for the common strides.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include "fastcnn/pool_window.h"

namespace fastcnn {

using at::cuda::detail::IntDivider;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const Vec<T, V>& x) {
  *reinterpret_cast<Vec<T, V>*>(p) = x;
}

// Dividers splitting a flat thread index into its coordinates, fastest first.
template <typename index_t>
struct Split {
  IntDivider<index_t> d0, d1, d2;
};

// relu(x * s + b) in opmath, rounded to scalar_t once. Without a scale s = 1 and without a bias b = 0: x * 1 + 0
// rounds back to x (-0 to +0, which the ReLU maps to 0 anyway), so one formula serves every case.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t affine_relu(scalar_t x, acc_t s, acc_t b) {
  const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x) * s + b));
  return v <= acc_t(0) ? acc_t(0) : v;
}

// Per-channel values (opmath) of channels c..c+V-1, or `fill` where there is no vector: one vector load, the host
// having checked alignment.
template <int V, typename acc_t, typename index_t>
__device__ __forceinline__ void load_channels(const acc_t* __restrict__ values, index_t c, acc_t fill, acc_t* out) {
  if (values == nullptr) {
    for (int k = 0; k < V; ++k) out[k] = fill;
    return;
  }
  const Vec<acc_t, V> x = load<V>(values + c);
  for (int k = 0; k < V; ++k) out[k] = x.v[k];
}

// windows_containing, with the strides 2 and 1 of nearly every CNN pool passed as literals so that, inlined, its two
// divisions fold into shifts rather than ~20-instruction division sequences (the NCHW backward pays them per element).
__device__ __forceinline__ void windows_along(int64_t p, int64_t k, int64_t s, int64_t pooled, int64_t& first,
                                              int64_t& last) {
  if (s == 2) return windows_containing(p, k, int64_t(2), pooled, first, last);
  if (s == 1) return windows_containing(p, k, int64_t(1), pooled, first, last);
  windows_containing(p, k, s, pooled, first, last);
}

}  // namespace fastcnn
