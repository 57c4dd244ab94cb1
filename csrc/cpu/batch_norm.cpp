// CPU kernels of the fused BatchNorm pieces (math in fastcnn/ops/batch_norm/reference.py):
//   batch_norm_stats            per-channel mean and biased variance, deterministic (fixed chunks, Chan merges)
//   scale_shift_add_relu        out = relu(x scale + shift + residual) and a uint8 ReLU mask, one pass
//   batch_norm_backward_reduce  with dz = grad_out unless gate <= 0: per-channel sum dz and sum dz (x - mean)
//   batch_norm_backward_elemt   grad_input = a (dz - b (x - mean) - d), and dz itself when asked
//   batch_norm_backward         both, with the per-channel coefficients between them, in one call
//   batch_norm_scale_shift      the training forward's per-channel scale and shift
//   batch_norm_update_running   the running statistics' update, in place
// The per-channel math of the last three is rounded as the tensor ops it replaces (same bits).
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
#include "fastcnn/cpu_loops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastcnn {
namespace {

constexpr int64_t kRowsPerChunk = 256;  // NHWC pixels per partial-statistics chunk

// Reductions accumulate as stock PyTorch's CPU BatchNorm does (at::acc_type: double for float and double inputs,
// float for bfloat16/float16); the results are stored in the op's dtype (float32, or float64 for float64).
template <typename scalar_t>
using sum_type = at::acc_type<scalar_t, /*is_cuda=*/false>;

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

template <typename acc_t>
std::vector<acc_t> per_channel_or(const c10::optional<at::Tensor>& t, int64_t C, acc_t fallback) {
  std::vector<acc_t> v(C, fallback);
  if (t.has_value()) std::copy_n(t->const_data_ptr<acc_t>(), C, v.begin());
  return v;
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

// scale = weight * rsqrt(var + eps), shift = bias - mean * scale, rounded as the tensor ops (see backward_kernel).
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

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) { FASTCNN_REGISTER_BATCH_NORM_OPS(m, cpu); }

}  // namespace fastcnn
