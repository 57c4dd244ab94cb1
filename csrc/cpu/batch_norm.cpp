// CPU kernels of the fused BatchNorm pieces (math in fastcnn/reference/batch_norm.py):
//   batch_norm_stats            per-channel mean and biased variance, deterministic (fixed chunks, Chan merges)
//   scale_shift_add_relu        out = relu(x scale + shift + residual) and a uint8 ReLU mask, one pass
//   batch_norm_backward_reduce  with dz = grad_out unless gate <= 0: per-channel sum dz and sum dz (x - mean)
//   batch_norm_backward_elemt   grad_input = a (dz - b (x - mean) - d), and dz itself when asked
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

// Two-pass moments of `len` values spaced `stride` apart: exact mean first, then the centred sum of squares.
template <typename scalar_t, typename acc_t>
Moments<acc_t> moments_of(const scalar_t* x, int64_t len, int64_t stride) {
  acc_t sum = 0;
  for (int64_t i = 0; i < len; ++i) sum += static_cast<acc_t>(x[i * stride]);
  const acc_t mean = sum / len;
  acc_t m2 = 0;
  for (int64_t i = 0; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(x[i * stride]) - mean;
    m2 += d * d;
  }
  return {static_cast<acc_t>(len), mean, m2};
}

// moments_of for every channel of `len` NHWC pixel rows at once: the same operations in the same order per channel
// (sum over the rows, mean, then the centred sum of squares), but with the channel loop innermost, so that it is
// unit-stride and vectorises.
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
        for (int64_t n = 0; n < L.N; ++n) total.merge(moments_of<scalar_t, acc_t>(xp + (n * L.C + c) * L.HW, L.HW, 1));
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

// Per-channel coefficients of elemt in opmath_type; an absent one is 0.
template <typename acc_t>
struct ElemtCoefficients {
  std::vector<acc_t> mean, a, b, d;
  explicit ElemtCoefficients(const ElemtCall& c)
      : mean(per_channel_or<acc_t>(c.in.mean, c.in.L.C, 0)),
        a(per_channel_or<acc_t>(c.a, c.in.L.C, 0)),
        b(per_channel_or<acc_t>(c.b, c.in.L.C, 0)),
        d(per_channel_or<acc_t>(c.d, c.in.L.C, 0)) {}
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

template <bool kCentred, bool kWantDz, typename scalar_t, typename gate_t>
void elemt_kernel(const ElemtCall& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const BnLayout& L = c.in.L;
  const BackwardRows<scalar_t, gate_t> rows(c.in);
  const ElemtCoefficients<acc_t> k(c);
  scalar_t* grad_x = c.grad_x.data_ptr<scalar_t>();
  scalar_t* dz = kWantDz ? c.dz.data_ptr<scalar_t>() : nullptr;
  const int64_t outer = L.channels_last ? L.N * L.HW : L.N * L.C;  // pixel rows, or (n, c) planes
  const int64_t len = L.channels_last ? L.C : L.HW;
  at::parallel_for(0, outer, grain_for(len), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (L.channels_last) {
        elemt_row<kCentred, kWantDz, 1>(rows.grad + s * rows.grad_stride, rows.gate + s * rows.gate_stride,
                                        rows.x + s * len, k.mean.data(), k.a.data(), k.b.data(), k.d.data(), len,
                                        grad_x + s * len, kWantDz ? dz + s * len : nullptr);
      } else {  // s = n * C + ch
        const int64_t n = s / L.C, ch = s % L.C, plane = ch * L.HW;
        elemt_row<kCentred, kWantDz, 0>(rows.grad + n * rows.grad_stride + plane,
                                        rows.gate + n * rows.gate_stride + plane, rows.x + s * len, &k.mean[ch],
                                        &k.a[ch], &k.b[ch], &k.d[ch], len, grad_x + s * len,
                                        kWantDz ? dz + s * len : nullptr);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  const BnLayout L = bn_layout(input, "input");
  const at::Tensor x = input.contiguous(L.format());
  at::Tensor mean = at::empty({L.C}, x.options().dtype(bn_acc_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats_cpu",
                                  [&] { stats_kernel<scalar_t>(x, L, mean, var); });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> scale_shift_add_relu_cpu(const at::Tensor& input,
                                                            const c10::optional<at::Tensor>& scale,
                                                            const at::Tensor& shift,
                                                            const c10::optional<at::Tensor>& residual,
                                                            bool save_mask) {
  ApplyCall c = apply_call(input, scale, shift, residual, save_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.x.scalar_type(), "scale_shift_add_relu_cpu", [&] {
    apply_kernel<scalar_t>(c.x, c.scale, c.shift, c.residual, c.L, c.out, c.mask);
  });
  return {c.out, c.mask};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                  const at::Tensor& input,
                                                                  const c10::optional<at::Tensor>& mean) {
  ReduceCall c = reduce_call(grad_out, gate, input, mean, /*keep_slices=*/true);
  dispatch_with_gate(c.in.x, c.in.gate, [&](auto s, auto gt) {
    using scalar_t = decltype(s);
    using gate_t = decltype(gt);
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
  dispatch_with_gate(c.in.x, c.in.gate, [&](auto s, auto gt) {
    using scalar_t = decltype(s);
    using gate_t = decltype(gt);
    if (centred) {
      want_dz ? elemt_kernel<true, true, scalar_t, gate_t>(c) : elemt_kernel<true, false, scalar_t, gate_t>(c);
    } else {
      want_dz ? elemt_kernel<false, true, scalar_t, gate_t>(c) : elemt_kernel<false, false, scalar_t, gate_t>(c);
    }
  });
  return {c.grad_x, c.dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("scale_shift_add_relu", &scale_shift_add_relu_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace fastcnn
