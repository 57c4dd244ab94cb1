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

template <typename scalar_t>
void stats_kernel(const at::Tensor& x, const BnLayout& L, at::Tensor& mean, at::Tensor& var) {
  using out_t = at::opmath_type<scalar_t>;
  using acc_t = sum_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  out_t* mp = mean.data_ptr<out_t>();
  out_t* vp = var.data_ptr<out_t>();
  if (!L.channels_last) {
    at::parallel_for(0, L.C, 1, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * kRowsPerChunk, len = std::min(kRowsPerChunk, rows - r0);
      for (int64_t c = 0; c < L.C; ++c) partial[k * L.C + c] = moments_of<scalar_t, acc_t>(xp + r0 * L.C + c, len, L.C);
    }
  });
  at::parallel_for(0, L.C, 16, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, segments, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, len)), [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) f(s * len, len, L.channels_last ? -1 : s % L.C);
  });
}

template <typename acc_t>
std::vector<acc_t> per_channel_or(const c10::optional<at::Tensor>& t, int64_t C, acc_t fallback) {
  std::vector<acc_t> v(C, fallback);
  if (t.has_value()) std::copy_n(t->const_data_ptr<acc_t>(), C, v.begin());
  return v;
}

// relu(x * scale + shift + residual) for one element, NaN propagating (as torch.relu: only v <= 0 becomes zero).
template <bool kResidual, bool kMask, typename scalar_t, typename acc_t>
inline void apply_one(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ rp, scalar_t* __restrict__ op,
                      uint8_t* __restrict__ mp, int64_t i, acc_t scale, acc_t shift) {
  acc_t v = static_cast<acc_t>(xp[i]) * scale + shift;
  if constexpr (kResidual) v += static_cast<acc_t>(rp[i]);
  const scalar_t o = static_cast<scalar_t>(v <= 0 ? acc_t(0) : v);
  op[i] = o;
  if constexpr (kMask) mp[i] = !(static_cast<acc_t>(o) <= 0);
}

// The residual and mask choices are template parameters and the two layouts separate loops, so the inner loops
// carry no branches (NHWC: unit-stride over channels with per-channel scale/shift, vectorised by the compiler).
template <bool kResidual, bool kMask, typename scalar_t>
void apply_loops(const scalar_t* xp, const scalar_t* rp, scalar_t* op, uint8_t* mp, const BnLayout& L,
                 const std::vector<at::opmath_type<scalar_t>>& sc, const std::vector<at::opmath_type<scalar_t>>& sh) {
  const auto* __restrict__ scp = sc.data();
  const auto* __restrict__ shp = sh.data();
  for_each_segment(L, [&](int64_t off, int64_t len, int64_t ch) {
    const scalar_t* x = xp + off;
    const scalar_t* r = kResidual ? rp + off : nullptr;
    scalar_t* o = op + off;
    uint8_t* m = kMask ? mp + off : nullptr;
    if (ch < 0) {
      for (int64_t i = 0; i < len; ++i) apply_one<kResidual, kMask>(x, r, o, m, i, scp[i], shp[i]);
    } else {
      for (int64_t i = 0; i < len; ++i) apply_one<kResidual, kMask>(x, r, o, m, i, scp[ch], shp[ch]);
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

// dz at one element: the gradient unless the gate (saved mask or recomputed activation) is <= 0, as ReLU's
// backward (threshold_backward) passes it, NaN included.
template <typename scalar_t, typename gate_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t gated(const scalar_t* g, const gate_t* gate, int64_t i) {
  return static_cast<acc_t>(gate[i]) <= 0 ? acc_t(0) : static_cast<acc_t>(g[i]);
}

template <typename scalar_t, typename gate_t>
void reduce_kernel(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& x,
                   const c10::optional<at::Tensor>& mean, const BnLayout& L, at::Tensor& sum_dz,
                   at::Tensor& sum_dz_xmu) {
  using out_t = at::opmath_type<scalar_t>;
  using acc_t = sum_type<scalar_t>;
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const gate_t* tp = gate.const_data_ptr<gate_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<acc_t> mu(L.C, 0);
  if (mean.has_value()) std::copy_n(mean->const_data_ptr<out_t>(), L.C, mu.begin());
  // Per-channel sums over fixed chunks (NCHW: one plane; NHWC: kRowsPerChunk pixels), merged in chunk order.
  const int64_t chunks = L.channels_last ? (L.N * L.HW + kRowsPerChunk - 1) / kRowsPerChunk : L.N * L.C;
  std::vector<acc_t> part_dz(L.channels_last ? chunks * L.C : chunks, 0), part_xmu(part_dz.size(), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (L.channels_last) {
        const int64_t r0 = k * kRowsPerChunk, r1 = std::min(r0 + kRowsPerChunk, L.N * L.HW);
        acc_t* __restrict__ sd = &part_dz[k * L.C];
        acc_t* __restrict__ sx = &part_xmu[k * L.C];
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = 0; c < L.C; ++c) {
            const acc_t dz = gated<scalar_t, gate_t, acc_t>(gp, tp, r * L.C + c);
            sd[c] += dz;
            sx[c] += dz * (static_cast<acc_t>(xp[r * L.C + c]) - mu[c]);
          }
        }
      } else {  // k = n * C + c: one plane
        const int64_t off = k * L.HW;
        const acc_t m = mu[k % L.C];
        acc_t sd = 0, sx = 0;
        for (int64_t i = 0; i < L.HW; ++i) {
          const acc_t dz = gated<scalar_t, gate_t, acc_t>(gp, tp, off + i);
          sd += dz;
          sx += dz * (static_cast<acc_t>(xp[off + i]) - m);
        }
        part_dz[k] = sd;
        part_xmu[k] = sx;
      }
    }
  });
  out_t* out_dz = sum_dz.data_ptr<out_t>();
  out_t* out_xmu = sum_dz_xmu.data_ptr<out_t>();
  const int64_t rows = L.channels_last ? chunks : L.N;
  for (int64_t c = 0; c < L.C; ++c) {
    acc_t sd = 0, sx = 0;
    for (int64_t k = 0; k < rows; ++k) {
      sd += part_dz[k * L.C + c];  // NHWC: chunk k; NCHW: plane (n = k, c)
      sx += part_xmu[k * L.C + c];
    }
    out_dz[c] = static_cast<out_t>(sd);
    out_xmu[c] = static_cast<out_t>(sx);
  }
}

template <typename scalar_t, typename gate_t>
void elemt_kernel(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& x,
                  const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& a,
                  const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& d, const BnLayout& L,
                  at::Tensor& grad_x, at::Tensor& dz_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const gate_t* tp = gate.const_data_ptr<gate_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const std::vector<acc_t> mu = per_channel_or<acc_t>(mean, L.C, 0), av = per_channel_or<acc_t>(a, L.C, 0),
                           bv = per_channel_or<acc_t>(b, L.C, 0), dv = per_channel_or<acc_t>(d, L.C, 0);
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  scalar_t* dzp = dz_out.numel() ? dz_out.data_ptr<scalar_t>() : nullptr;
  for_each_segment(L, [&](int64_t off, int64_t len, int64_t ch) {
    for (int64_t i = 0; i < len; ++i) {
      const int64_t c = ch < 0 ? i : ch;
      const acc_t dz = gated(gp, tp, off + i);
      gxp[off + i] = static_cast<scalar_t>(av[c] * (dz - bv[c] * (static_cast<acc_t>(xp[off + i]) - mu[c]) - dv[c]));
      if (dzp) dzp[off + i] = static_cast<scalar_t>(dz);
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
  ReduceCall c = reduce_call(grad_out, gate, input, mean);
  const BackwardInputs& in = c.in;
  dispatch_with_gate(in.x, in.gate, [&](auto s, auto gt) {
    reduce_kernel<decltype(s), decltype(gt)>(in.grad_out, in.gate, in.x, in.mean, in.L, c.sum_dz, c.sum_dz_xmu);
  });
  return {c.sum_dz, c.sum_dz_xmu};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input, const c10::optional<at::Tensor>& mean,
    const at::Tensor& a, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& d, bool want_dz) {
  ElemtCall c = elemt_call(grad_out, gate, input, mean, a, b, d, want_dz);
  const BackwardInputs& in = c.in;
  dispatch_with_gate(in.x, in.gate, [&](auto s, auto gt) {
    elemt_kernel<decltype(s), decltype(gt)>(in.grad_out, in.gate, in.x, in.mean, c.a, c.b, c.d, in.L, c.grad_x, c.dz);
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
