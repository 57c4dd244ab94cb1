// CPU kernels of the fused BatchNorm backward pieces (math in fastcnn/ops/batch_norm/reference.py):
//   batch_norm_backward_reduce  with dz = grad_out unless gate <= 0: per-channel sum dz and sum dz (x - mean)
//   batch_norm_backward_elemt   grad_input = a (dz - b (x - mean) - d), and dz itself when asked
//   batch_norm_backward         both, with the per-channel coefficients between them, in one call (the same bits as
//                               the composition it replaces)
//
// Both layouts are walked as rows of contiguous elements (NHWC: one pixel's C channels; NCHW: one (n, c) plane).
// Sums accumulate in sum_type over fixed pieces whose partial results are added in a fixed order, so results do not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastcnn/batch_norm.h"
#include "fastcnn/batch_norm_cpu.h"
#include "fastcnn/cpu_loops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fastcnn {
namespace {

using bn_cpu::kRowsPerChunk;
using bn_cpu::per_channel_or;
using bn_cpu::sum_type;

// Both backward pieces read dz = grad_out where the gate is open: not `gate <= 0`, as ReLU's backward
// (threshold_backward) passes it, NaN included. A uint8 mask is open where it is nonzero.
template <typename gate_t>
inline bool gate_open(gate_t g) {
  if constexpr (std::is_same_v<gate_t, uint8_t>) {
    return g != 0;
  } else {
    return !(static_cast<at::opmath_type<gate_t>>(g) <= 0);
  }
}

// dz in acc_t: g, or +0 where the gate is closed, selected on g's bits (keep_if) so that the loops vectorise.
template <typename acc_t, typename scalar_t, typename gate_t>
inline acc_t gated(scalar_t g, gate_t gate) {
  return static_cast<acc_t>(keep_if(g, gate_open(gate)));
}

// The backward loops below are compiled for AVX2 too (FASTCNN_VECTOR_CLONES, fastcnn/cpu_loops.h).

// The tensors both pieces read, as raw rows (see row_stride_of: NHWC one pixel's C channels, NCHW one sample's
// C * H * W values; x is dense, grad_out and gate may be channel slices with farther-apart rows).
template <typename scalar_t, typename gate_t>
struct BackwardRows {
  const scalar_t* grad;
  const gate_t* gate;
  const scalar_t* x;
  int64_t grad_stride, gate_stride, x_stride;

  explicit BackwardRows(const BackwardInputs& in)
      : grad(in.grad_out.const_data_ptr<scalar_t>()),
        gate(in.gate.const_data_ptr<gate_t>()),
        x(in.x.const_data_ptr<scalar_t>()),
        grad_stride(in.grad_row_stride),
        gate_stride(in.gate_row_stride),
        x_stride(in.L.channels_last ? in.L.C : in.L.C * in.L.HW) {}
};

// Sums over `len` elements of dz and dz (x - mu) added into sd[i] and sx[i], mean of element i at mu[i * kStep]
// (NHWC: one pixel row, i = channel, kStep 1; an NCHW plane's lanes, kStep 0). One accumulator per element, so the
// loop vectorises without reassociating any sum.
template <bool kCentred, int kStep, typename acc_t, typename scalar_t, typename gate_t>
inline void accumulate_row(const scalar_t* __restrict__ g, const gate_t* __restrict__ t,
                           const scalar_t* __restrict__ x, const acc_t* __restrict__ mu, int64_t len,
                           acc_t* __restrict__ sd, acc_t* __restrict__ sx) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t dz = gated<acc_t>(g[i], t[i]);
    const acc_t centred = kCentred ? static_cast<acc_t>(x[i]) - mu[i * kStep] : static_cast<acc_t>(x[i]);
    sd[i] += dz;
    sx[i] += dz * centred;
  }
}

// The same two sums over one contiguous NCHW plane of one channel (mean m), into kLanes interleaved partial sums
// (element i goes to lane i % kLanes) added in lane order at the end: a fixed order, so deterministic, and the lane
// loop vectorises.
template <bool kCentred, typename acc_t, typename scalar_t, typename gate_t>
FASTCNN_VECTOR_CLONES void accumulate_plane(const scalar_t* __restrict__ g, const gate_t* __restrict__ t,
                                            const scalar_t* __restrict__ x, acc_t m, int64_t len, acc_t& sum_dz,
                                            acc_t& sum_xmu) {
  constexpr int64_t kLanes = 8;
  acc_t sd[kLanes] = {}, sx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) accumulate_row<kCentred, 0>(g + i, t + i, x + i, &m, kLanes, sd, sx);
  accumulate_row<kCentred, 0>(g + i, t + i, x + i, &m, len - i, sd, sx);
  for (int64_t j = 0; j < kLanes; ++j) {
    sum_dz += sd[j];
    sum_xmu += sx[j];
  }
}

// NHWC pixel rows [r0, r1) summed into the per-channel sd and sx.
template <bool kCentred, typename acc_t, typename scalar_t, typename gate_t>
FASTCNN_VECTOR_CLONES void accumulate_rows(const BackwardRows<scalar_t, gate_t>& rows, int64_t r0, int64_t r1,
                                           const acc_t* mu, int64_t C, acc_t* sd, acc_t* sx) {
  for (int64_t r = r0; r < r1; ++r) {
    accumulate_row<kCentred, 1>(rows.grad + r * rows.grad_stride, rows.gate + r * rows.gate_stride,
                                rows.x + r * rows.x_stride, mu, C, sd, sx);
  }
}

// Per-channel sum dz and sum dz (x - mean), accumulated in sum_type over fixed pieces (NHWC: kRowsPerChunk pixel
// rows; NCHW: one (n, c) plane) whose partial sums are added in piece order: the result does not depend on the
// thread count.
template <bool kCentred, typename scalar_t, typename gate_t>
void reduce_kernel(const BackwardInputs& in, at::Tensor& sum_dz, at::Tensor& sum_dz_xmu) {
  using out_t = at::opmath_type<scalar_t>;
  using acc_t = sum_type<scalar_t>;
  const BnLayout& L = in.L;
  if (L.C == 0) return;  // (an empty branch of an Inception block)
  const BackwardRows<scalar_t, gate_t> rows(in);
  std::vector<acc_t> mu(L.C, 0);
  if (kCentred) std::copy_n(in.mean->const_data_ptr<out_t>(), L.C, mu.begin());
  const int64_t pieces = L.channels_last ? (L.N * L.HW + kRowsPerChunk - 1) / kRowsPerChunk : L.N * L.C;
  // NHWC: C sums per piece; NCHW: one per piece, i.e. per (n, c) - either way piece k's sums start at k * width.
  const int64_t width = L.channels_last ? L.C : 1;
  std::vector<acc_t> part_dz(pieces * width, 0), part_xmu(pieces * width, 0);
  if (L.channels_last) {
    at::parallel_for(0, pieces, grain_for(kRowsPerChunk * L.C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        accumulate_rows<kCentred>(rows, k * kRowsPerChunk, std::min((k + 1) * kRowsPerChunk, L.N * L.HW),
                                  mu.data(), L.C, &part_dz[k * L.C], &part_xmu[k * L.C]);
      }
    });
  } else {
    at::parallel_for(0, pieces, grain_for(L.HW), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {  // k = n * C + c
        const int64_t n = k / L.C, plane = (k % L.C) * L.HW;
        accumulate_plane<kCentred>(rows.grad + n * rows.grad_stride + plane, rows.gate + n * rows.gate_stride + plane,
                                   rows.x + n * rows.x_stride + plane, mu[k % L.C], L.HW, part_dz[k], part_xmu[k]);
      }
    });
  }
  // Both layouts now hold rows of C partial sums (NHWC: per chunk; NCHW: per sample), added row after row.
  std::vector<acc_t> total_dz(L.C, 0), total_xmu(L.C, 0);
  for (int64_t k = 0; k < pieces * width / L.C; ++k) {
    for (int64_t c = 0; c < L.C; ++c) {
      total_dz[c] += part_dz[k * L.C + c];
      total_xmu[c] += part_xmu[k * L.C + c];
    }
  }
  std::copy(total_dz.begin(), total_dz.end(), sum_dz.data_ptr<out_t>());
  std::copy(total_xmu.begin(), total_xmu.end(), sum_dz_xmu.data_ptr<out_t>());
}

// Per-channel coefficients of elemt in opmath_type, C values each (mean, b and d are read only when centred).
template <typename acc_t>
struct ElemtCoefficients {
  const acc_t *mean, *a, *b, *d;
};

// grad_x = a (dz - b (x - mean) - d) over `len` elements, coefficient k of element i at index i * kStep (NHWC:
// kStep 1, one coefficient per channel; NCHW: kStep 0, the plane's channel). Without b and d (kCentred false: the
// eval-mode affine map) grad_x = a dz, and x is not read.
template <bool kCentred, bool kWantDz, int kStep, typename acc_t, typename scalar_t, typename gate_t>
FASTCNN_VECTOR_CLONES void elemt_row(const scalar_t* __restrict__ g, const gate_t* __restrict__ t,
                                     const scalar_t* __restrict__ x, const acc_t* __restrict__ mu,
                                     const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                     const acc_t* __restrict__ d, int64_t len, scalar_t* __restrict__ grad_x,
                                     scalar_t* __restrict__ dz_out) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t k = i * kStep;
    const acc_t dz = gated<acc_t>(g[i], t[i]);
    const acc_t inner = kCentred ? dz - b[k] * (static_cast<acc_t>(x[i]) - mu[k]) - d[k] : dz;
    grad_x[i] = static_cast<scalar_t>(a[k] * inner);
    if constexpr (kWantDz) dz_out[i] = static_cast<scalar_t>(dz);
  }
}

template <bool kCentred, bool kWantDz, typename scalar_t, typename gate_t, typename acc_t>
void elemt_kernel(const BackwardInputs& in, const ElemtCoefficients<acc_t>& k, at::Tensor& grad_x_out,
                  at::Tensor& dz_out) {
  const BnLayout& L = in.L;
  const BackwardRows<scalar_t, gate_t> rows(in);
  scalar_t* grad_x = grad_x_out.data_ptr<scalar_t>();
  scalar_t* dz = kWantDz ? dz_out.data_ptr<scalar_t>() : nullptr;
  const int64_t outer = L.channels_last ? L.N * L.HW : L.N * L.C;  // pixel rows, or (n, c) planes
  const int64_t len = L.channels_last ? L.C : L.HW;
  at::parallel_for(0, outer, grain_for(len), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (L.channels_last) {
        elemt_row<kCentred, kWantDz, 1>(rows.grad + s * rows.grad_stride, rows.gate + s * rows.gate_stride,
                                        rows.x + s * len, k.mean, k.a, k.b, k.d, len, grad_x + s * len,
                                        kWantDz ? dz + s * len : nullptr);
      } else {  // s = n * C + ch
        const int64_t n = s / L.C, ch = s % L.C, plane = ch * L.HW;
        elemt_row<kCentred, kWantDz, 0>(rows.grad + n * rows.grad_stride + plane,
                                        rows.gate + n * rows.gate_stride + plane, rows.x + s * len, k.mean + ch,
                                        k.a + ch, k.b + ch, k.d + ch, len, grad_x + s * len,
                                        kWantDz ? dz + s * len : nullptr);
      }
    }
  });
}

// elemt_kernel for the run's choices (centred: b, d and mean are read; want_dz: dz is stored).
template <typename scalar_t, typename gate_t, typename acc_t>
void run_elemt(const BackwardInputs& in, const ElemtCoefficients<acc_t>& k, bool centred, bool want_dz,
               at::Tensor& grad_x, at::Tensor& dz) {
  if (centred) {
    want_dz ? elemt_kernel<true, true, scalar_t, gate_t>(in, k, grad_x, dz)
            : elemt_kernel<true, false, scalar_t, gate_t>(in, k, grad_x, dz);
  } else {
    want_dz ? elemt_kernel<false, true, scalar_t, gate_t>(in, k, grad_x, dz)
            : elemt_kernel<false, false, scalar_t, gate_t>(in, k, grad_x, dz);
  }
}

// batch_norm_backward: the reduction into grad_bias (sum dz) and grad_weight (sum dz (x - mean)), the coefficients of
// grad_x = a (dz - b (x - mean) - d), then the elementwise pass. The coefficients are computed in acc_t with each
// operation rounded once, in the order of the tensor ops this replaces (_training.py: invstd = rsqrt(var + eps),
// a = weight * invstd, b = invstd * invstd * sum_dz_xmu / M, d = sum_dz / M, grad_weight = sum_dz_xmu * invstd), so
// the results are bitwise those of the composition. (No FMA: the build targets x86-64 and AVX2 without -mfma, so
// nothing is contracted.)
template <typename scalar_t, typename gate_t>
void backward_kernel(BackwardCall& c, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  reduce_kernel<true, scalar_t, gate_t>(c.in, c.grad_bias, c.grad_weight);
  const int64_t C = c.in.L.C;
  const acc_t count = static_cast<acc_t>(c.in.L.N * c.in.L.HW), eps_acc = static_cast<acc_t>(eps);
  const acc_t* var = c.var.const_data_ptr<acc_t>();
  const acc_t* weight = c.weight.const_data_ptr<acc_t>();
  const acc_t* sum_dz = c.grad_bias.const_data_ptr<acc_t>();
  acc_t* grad_weight = c.grad_weight.data_ptr<acc_t>();
  std::vector<acc_t> a(C), b(C), d(C);
  for (int64_t ch = 0; ch < C; ++ch) {
    const acc_t invstd = acc_t(1) / std::sqrt(var[ch] + eps_acc);
    a[ch] = weight[ch] * invstd;
    b[ch] = invstd * invstd * grad_weight[ch] / count;
    d[ch] = sum_dz[ch] / count;
    grad_weight[ch] = grad_weight[ch] * invstd;
  }
  const ElemtCoefficients<acc_t> k{c.in.mean->const_data_ptr<acc_t>(), a.data(), b.data(), d.data()};
  run_elemt<scalar_t, gate_t>(c.in, k, true, c.dz.numel() > 0, c.grad_x, c.dz);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                  const at::Tensor& input,
                                                                  const c10::optional<at::Tensor>& mean) {
  ReduceCall c = reduce_call(grad_out, gate, input, mean, /*keep_slices=*/true);
  FASTCNN_DISPATCH_WITH_GATE(c.in.x, c.in.gate, "batch_norm_backward_reduce_cpu", {
    c.in.mean.has_value() ? reduce_kernel<true, scalar_t, gate_t>(c.in, c.sum_dz, c.sum_dz_xmu)
                          : reduce_kernel<false, scalar_t, gate_t>(c.in, c.sum_dz, c.sum_dz_xmu);
  });
  return {c.sum_dz, c.sum_dz_xmu};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input, const c10::optional<at::Tensor>& mean,
    const at::Tensor& a, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& d, bool want_dz) {
  ElemtCall c = elemt_call(grad_out, gate, input, mean, a, b, d, want_dz, /*keep_slices=*/true);
  const bool centred = c.b.has_value() || c.d.has_value();
  const int64_t C = c.in.L.C;
  FASTCNN_DISPATCH_WITH_GATE(c.in.x, c.in.gate, "batch_norm_backward_elemt_cpu", {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> mu = per_channel_or<acc_t>(c.in.mean, C, 0), av = per_channel_or<acc_t>(c.a, C, 0),
                             bv = per_channel_or<acc_t>(c.b, C, 0), dv = per_channel_or<acc_t>(c.d, C, 0);
    const ElemtCoefficients<acc_t> k{mu.data(), av.data(), bv.data(), dv.data()};
    run_elemt<scalar_t, gate_t>(c.in, k, centred, want_dz, c.grad_x, c.dz);
  });
  return {c.grad_x, c.dz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool want_dz) {
  BackwardCall c = backward_call(grad_out, gate, input, weight, mean, var, want_dz, /*keep_slices=*/true);
  FASTCNN_DISPATCH_WITH_GATE(c.in.x, c.in.gate, "batch_norm_backward_cpu", backward_kernel<scalar_t, gate_t>(c, eps));
  return {c.grad_x, c.grad_weight, c.grad_bias, c.dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) { FASTCNN_REGISTER_BATCH_NORM_BACKWARD_OPS(m, cpu); }

}  // namespace fastcnn
