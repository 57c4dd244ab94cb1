#pragma once
// What the CPU BatchNorm kernels share: cpu/batch_norm.cpp (statistics, the forward map, the per-channel updates) and
// cpu/batch_norm_backward.cpp (the backward pieces).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>

#include <algorithm>
#include <vector>

namespace fastcnn {
namespace bn_cpu {

constexpr int64_t kRowsPerChunk = 256;  // NHWC pixels per partial-sum chunk

// Reductions accumulate as stock PyTorch's CPU BatchNorm does (at::acc_type: double for float and double inputs,
// float for bfloat16/float16); the results are stored in the op's dtype (float32, or float64 for float64).
template <typename scalar_t>
using sum_type = at::acc_type<scalar_t, /*is_cuda=*/false>;

// The C values of an optional per-channel tensor (in acc_t), or `fallback` for each where it is absent.
template <typename acc_t>
std::vector<acc_t> per_channel_or(const c10::optional<at::Tensor>& t, int64_t C, acc_t fallback) {
  std::vector<acc_t> v(C, fallback);
  if (t.has_value()) std::copy_n(t->const_data_ptr<acc_t>(), C, v.begin());
  return v;
}

}  // namespace bn_cpu
}  // namespace fastcnn
