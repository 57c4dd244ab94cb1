// Index arithmetic of the elementwise CUDA kernels: splitting a flat element index into coordinates by 32-bit
// multiply-shift division (at::cuda::detail::IntDivider<uint32_t>: a multiply-high, an add and a shift) where every
// index the kernel forms fits in int32, and by plain int64 division (a ~20-instruction software sequence on NVIDIA
// GPUs, per division) otherwise. Kernels are instantiated for both index types; with_index_type picks one per call.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <cstdint>
#include <limits>

namespace fastcnn {

using at::cuda::detail::IntDivider;

// Calls f(index_t{}): uint32_t (multiply-shift division) when every index the kernel forms is below
// max_index <= INT32_MAX, else int64_t. IntDivider<uint32_t> is exact for numerators below 2^31 and divisors in
// [1, INT32_MAX]; callers build dividers only for non-empty extents.
template <typename F>
void with_index_type(int64_t max_index, const F& f) {
  if (max_index <= std::numeric_limits<int32_t>::max()) return f(uint32_t{});
  f(int64_t{});
}

template <typename index_t>
IntDivider<index_t> divider(int64_t d) {
  return IntDivider<index_t>(static_cast<index_t>(d));
}

}  // namespace fastcnn
