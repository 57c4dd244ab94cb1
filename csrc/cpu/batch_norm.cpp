// CPU kernels of the fused BatchNorm pieces (math in fastcnn/ops/batch_norm/reference.py); the backward pieces are
// in batch_norm_backward.cpp:
//   batch_norm_stats            per-channel mean and biased variance, deterministic (fixed chunks, Chan merges)
//   scale_shift_add_relu        out = relu(x scale + shift + residual) and a uint8 ReLU mask, one pass
//   batch_norm_scale_shift      the training forward's per-channel scale and shift
//   batch_norm_update_running   the running statistics' update, in place
// The per-channel math of the last two is rounded as the tensor ops it replaces (same bits).
//
// Both layouts are walked as "segments" of contiguous elements: NCHW: the H*W pixels of one (n, c) plane, all of
// channel c; NHWC: the C channels of one pixel, unit-stride in c (the compiler vectorises these loops). Sums
// accumulate in at::opmath_type (fp32 for bf16/fp16) over fixed chunks whose partial results are merged in a fixed
// order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastcnn/batch_norm.h"
#include "fastcnn/batch_norm_cpu.h"
#include "fastcnn/cpu_loops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastcnn {
namespace {

using bn_cpu::kRowsPerChunk;
using bn_cpu::per_channel_or;
using bn_cpu::sum_type;

// Per-channel statistics of a chunk: count, mean and M2 = sum (x - mean)^2, merged with Chan et al.'s formula.
template <typename acc_t>
struct Moments {
  acc_t count = 0, mean = 0, m2 = 0;
  void merge(const Moments& b) {
    if (b.count == 0) return;
    const acc_t n = count + b.count, delta = b.mean - mean;
    mean += delta * (b.count / n);
    m2 += b.m2 + delta * delta * (count * b.count / n);
    count = n;
  }
};

// Two-pass moments of the `len` contiguous values of one NCHW plane: exact mean first, then the centred sum of
// squares. Each sum runs in kLanes interleaved partial sums (element i into lane i % kLanes) added in lane order at
// the end: a fixed order (deterministic, thread-count independent) that lets the lane loops vectorise.
template <typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES Moments<acc_t> plane_moments(const scalar_t* __restrict__ x, int64_t len) {
  constexpr int64_t kLanes = 8;
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(x[i + j]);
  }
  for (int64_t j = 0; i + j < len; ++j) lane[j] += static_cast<acc_t>(x[i + j]);
  acc_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lane[j];
  const acc_t mean = sum / len;
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = 0;
  for (i = 0; i + kLanes <= len; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(x[i + j]) - mean;
      lane[j] += d * d;
    }
  }
  for (int64_t j = 0; i + j < len; ++j) {
    const acc_t d = static_cast<acc_t>(x[i + j]) - mean;
    lane[j] += d * d;
  }
  acc_t m2 = 0;
  for (int64_t j = 0; j < kLanes; ++j) m2 += lane[j];
  return {static_cast<acc_t>(len), mean, m2};
}

// Two-pass moments of every channel of `len` NHWC pixel rows at once (per channel: sum over the rows, mean, then the
// centred sum of squares), with the channel loop innermost, so that it is unit-stride and vectorises.
template <typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void chunk_moments(const scalar_t* __restrict__ x, int64_t len, int64_t C,
                                         acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = 0;
  for (int64_t r = 0; r < len; ++r) {
    for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<acc_t>(x[r * C + c]);
  }
  for (int64_t c = 0; c < C; ++c) mean[c] /= len;
  for (int64_t r = 0; r < len; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(x[r * C + c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

template <typename scalar_t>
void stats_kernel(const at::Tensor& x, const BnLayout& L, at::Tensor& mean, at::Tensor& var) {
  using out_t = at::opmath_type<scalar_t>;
  using acc_t = sum_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  out_t* mp = mean.data_ptr<out_t>();
  out_t* vp = var.data_ptr<out_t>();
  if (!L.channels_last) {
    at::parallel_for(0, L.C, grain_for(L.N * L.HW), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Moments<acc_t> total;
        for (int64_t n = 0; n < L.N; ++n) total.merge(plane_moments<scalar_t, acc_t>(xp + (n * L.C + c) * L.HW, L.HW));
        mp[c] = static_cast<out_t>(total.mean);
        vp[c] = static_cast<out_t>(total.m2 / total.count);
      }
    });
    return;
  }
  const int64_t rows = L.N * L.HW, chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<Moments<acc_t>> partial(chunks * L.C);
  at::parallel_for(0, chunks, grain_for(2 * kRowsPerChunk * L.C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(L.C), m2(L.C);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * kRowsPerChunk, len = std::min(kRowsPerChunk, rows - r0);
      chunk_moments<scalar_t, acc_t>(xp + r0 * L.C, len, L.C, mean.data(), m2.data());
      for (int64_t c = 0; c < L.C; ++c) partial[k * L.C + c] = {static_cast<acc_t>(len), mean[c], m2[c]};
    }
  });
  at::parallel_for(0, L.C, grain_for(8 * chunks), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments<acc_t> total;
      for (int64_t k = 0; k < chunks; ++k) total.merge(partial[k * L.C + c]);
      mp[c] = static_cast<out_t>(total.mean);
      vp[c] = static_cast<out_t>(total.m2 / total.count);
    }
  });
}

// Calls f(segment_begin, length, channel_or_minus_one) for every segment, in parallel. For NHWC segments
// (channel -1) element i of a segment has channel i.
template <typename F>
void for_each_segment(const BnLayout& L, const F& f) {
  const int64_t segments = L.channels_last ? L.N * L.HW : L.N * L.C;
  const int64_t len = L.channels_last ? L.C : L.HW;
  at::parallel_for(0, segments, grain_for(len), [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) f(s * len, len, L.channels_last ? -1 : s % L.C);
  });
}


// relu(x * scale + shift + residual) over `len` elements, the scale and shift of element i at index i * kStep (NHWC:
// kStep 1, one per channel; NCHW: kStep 0, the plane's channel), and the uint8 mask (out not <= 0) when kMask. NaN
// propagates as torch.relu's does (only v <= 0 becomes zero). Every pointer is __restrict__ (the uint8 mask store may
// otherwise alias anything and force every pointer to be reloaded after it) and the ReLU is a bit select (keep_if;
// with `v <= 0 ? 0 : v` GCC branches around both stores), so the loop vectorises.
template <bool kResidual, bool kMask, int kStep, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void apply_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                     scalar_t* __restrict__ o, uint8_t* __restrict__ m, int64_t len,
                                     const acc_t* __restrict__ scale, const acc_t* __restrict__ shift) {
  for (int64_t i = 0; i < len; ++i) {
    acc_t v = static_cast<acc_t>(x[i]) * scale[i * kStep] + shift[i * kStep];
    if constexpr (kResidual) v += static_cast<acc_t>(r[i]);
    const scalar_t out = static_cast<scalar_t>(keep_if(v, !(v <= acc_t(0))));
    o[i] = out;
    if constexpr (kMask) m[i] = static_cast<uint8_t>(!(static_cast<acc_t>(out) <= acc_t(0)));
  }
}

// The residual and mask choices are template parameters and the two layouts separate loops, so the inner loops
// carry no branches.
template <bool kResidual, bool kMask, typename scalar_t>
void apply_loops(const scalar_t* xp, const scalar_t* rp, scalar_t* op, uint8_t* mp, const BnLayout& L,
                 const std::vector<at::opmath_type<scalar_t>>& sc, const std::vector<at::opmath_type<scalar_t>>& sh) {
  const auto* scp = sc.data();
  const auto* shp = sh.data();
  for_each_segment(L, [&](int64_t off, int64_t len, int64_t ch) {
    const scalar_t* r = kResidual ? rp + off : nullptr;
    uint8_t* m = kMask ? mp + off : nullptr;
    if (ch < 0) {
      apply_row<kResidual, kMask, 1>(xp + off, r, op + off, m, len, scp, shp);
    } else {
      apply_row<kResidual, kMask, 0>(xp + off, r, op + off, m, len, scp + ch, shp + ch);
    }
  });
}

template <typename scalar_t>
void apply_kernel(const at::Tensor& x, const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                  const c10::optional<at::Tensor>& residual, const BnLayout& L, at::Tensor& out, at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> sc = per_channel_or<acc_t>(scale, L.C, 1), sh = per_channel_or<acc_t>(shift, L.C, 0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  uint8_t* mp = mask.numel() ? mask.data_ptr<uint8_t>() : nullptr;
  if (residual.has_value()) {
    mp ? apply_loops<true, true>(xp, rp, op, mp, L, sc, sh) : apply_loops<true, false>(xp, rp, op, mp, L, sc, sh);
  } else {
    mp ? apply_loops<false, true>(xp, rp, op, mp, L, sc, sh) : apply_loops<false, false>(xp, rp, op, mp, L, sc, sh);
  }
}

// scale = weight * rsqrt(var + eps), shift = bias - mean * scale, rounded as the tensor ops (see backward_kernel in batch_norm_backward.cpp).
template <typename acc_t>
void scale_shift_kernel(const acc_t* weight, const acc_t* bias, const acc_t* mean, const acc_t* var, acc_t eps,
                        int64_t C, acc_t* scale, acc_t* shift) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t invstd = acc_t(1) / std::sqrt(var[c] + eps);
    scale[c] = weight[c] * invstd;
    const acc_t mean_scale = mean[c] * scale[c];
    shift[c] = bias[c] - mean_scale;
  }
}

void batch_norm_stats_cpu(const BnLayout& L, const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats_cpu",
                                  [&] { stats_kernel<scalar_t>(x, L, mean, var); });
}

void scale_shift_add_relu_cpu(ApplyCall& c) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.x.scalar_type(), "scale_shift_add_relu_cpu", [&] {
    apply_kernel<scalar_t>(c.x, c.scale, c.shift, c.residual, c.L, c.out, c.mask);
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_scale_shift_cpu(const at::Tensor& weight, const at::Tensor& bias,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps) {
  check_scale_shift_args(weight, bias, mean, var);
  const at::Tensor w = weight.contiguous(), b = bias.contiguous(), m = mean.contiguous(), v = var.contiguous();
  at::Tensor scale = at::empty_like(w), shift = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "batch_norm_scale_shift_cpu", [&] {
    scale_shift_kernel<scalar_t>(w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                 m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 static_cast<scalar_t>(eps), w.numel(), scale.data_ptr<scalar_t>(),
                                 shift.data_ptr<scalar_t>());
  });
  return {scale, shift};
}

// The tensor ops of the composition (fastcnn/ops/batch_norm/__init__.py), each rounded once in scalar_t with the
// Python floats rounded to scalar_t first, as ATen rounds a Python scalar to the tensor's opmath type.
void batch_norm_update_running_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                   const at::Tensor& var, double factor, int64_t count) {
  check_running_args(running_mean, running_var, mean, var, count);
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "batch_norm_update_running_cpu", [&] {
    const auto keep = static_cast<scalar_t>(1 - factor), take = static_cast<scalar_t>(factor);
    const auto unbias = static_cast<scalar_t>(static_cast<double>(count) / static_cast<double>(count - 1));
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < running_mean.numel(); ++c) {
      const scalar_t old_mean = rm[c] * keep, new_mean = mp[c] * take;
      rm[c] = old_mean + new_mean;
      const scalar_t unbiased = vp[c] * unbias;
      const scalar_t old_var = rv[c] * keep, new_var = unbiased * take;
      rv[c] = old_var + new_var;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) { FASTCNN_REGISTER_BATCH_NORM_FORWARD_OPS(m, cpu); }

}  // namespace fastcnn
