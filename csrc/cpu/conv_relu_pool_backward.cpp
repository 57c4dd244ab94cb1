// CPU backward of the fused epilogue (fastcnn::bias_relu_pool_backward): the gradient at z = conv * scale + bias,
// rebuilt from the pooled gradient and the compact code, and the bias gradient reduced in the same pass.
//
// With the windows not overlapping (every pool the blocks use, and the ReLU-only pool="none"), ONE parallel pass
// reads each pooled gradient, output and code once and writes each full-resolution element once:
//   max: dz = g where the element is the window's selected one (code == its offset) and the ReLU passed (y > 0);
//   avg: dz = g / area where the element's code bit is set (its ReLU passed);
//   none: dz = g where y > 0 (threshold_backward).
// Elements in no window (the floor-mode remainder, gaps when stride > kernel) get 0 in the same pass.
// grad_bias[c] = sum of dz over (n, h, w), summed while dz is written: per work unit (NCHW: one (n, c) plane, in 16
// interleaved lanes; NHWC: the conv rows of one pooled row (n, ph), a partial sum per channel) and the units' partial
// sums added in unit order. The units do not depend on the thread count, so neither does any result; no atomics.
// Selections are made on the bits (keep_if), so the inner loops have no branches and vectorise; the loops are
// compiled for AVX2 too (FASTCNN_VECTOR_CLONES), with the same operations in the same order.
//
// Overlapping windows (e.g. 3x3 stride 2) gather instead: each conv element adds, in a fixed order, the gradients of
// the windows that route to it; the bias gradient is then summed from grad_conv in a second pass.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastcnn/bias_relu_pool.h"
#include "fastcnn/checks.h"
#include "fastcnn/cpu_loops.h"

#include <algorithm>
#include <vector>

namespace fastcnn {
namespace {

constexpr int64_t kLanes = 16;  // interleaved partial sums of an NCHW plane

// Sizes of the conv tensor (N, C, H, W) and the pooled one (PH, PW), and the window (1x1 for pool="none").
struct Geometry {
  bool channels_last;
  int64_t N, C, H, W, PH, PW;
  PoolWindow win;
  // Conv rows [ph * sh, band_end(ph)) belong to pooled row ph; the last band also takes the floor-mode remainder.
  int64_t band_end(int64_t ph) const { return ph == PH - 1 ? H : (ph + 1) * win.sh; }
  int64_t col_end(int64_t pw) const { return pw == PW - 1 ? W : (pw + 1) * win.sw; }
  bool overlapping() const { return win.kh > win.sh || win.kw > win.sw; }
  bool is_2x2() const { return win.kh == 2 && win.kw == 2 && win.sh == 2 && win.sw == 2; }
};

template <typename acc_t>
inline acc_t sum_lanes(const acc_t* lanes) {
  acc_t s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// g where the ReLU passed (y not <= 0, NaN included, as threshold_backward), else +0.
template <typename acc_t, typename scalar_t>
inline scalar_t relu_gated(scalar_t g, scalar_t y) {
  return keep_if(g, relu_passes(static_cast<acc_t>(y)));
}

// dz of the conv element at window offset `offset` of a pooled element (g, y, code).
template <PoolMode kMode, typename acc_t, typename scalar_t>
inline scalar_t routed(scalar_t g, scalar_t y, uint8_t code, int64_t offset, acc_t inv_area) {
  if constexpr (kMode == PoolMode::Avg) {
    return keep_if(static_cast<scalar_t>(static_cast<acc_t>(g) * inv_area), ((code >> offset) & 1) != 0);
  } else if constexpr (kMode == PoolMode::Max) {
    return keep_if(relu_gated<acc_t>(g, y), code == offset);
  } else {
    return relu_gated<acc_t>(g, y);
  }
}

// --- NCHW: one (n, c) plane per work unit; returns the plane's sum of dz. ---

// pool="none": the plane is one contiguous run.
template <typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES acc_t relu_plane(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y, int64_t len,
                                       scalar_t* __restrict__ d) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const scalar_t v = relu_gated<acc_t>(g[i + l], y[i + l]);
      d[i + l] = v;
      lanes[l] += static_cast<acc_t>(v);
    }
  }
  for (int64_t l = 0; i + l < len; ++l) {
    const scalar_t v = relu_gated<acc_t>(g[i + l], y[i + l]);
    d[i + l] = v;
    lanes[l] += static_cast<acc_t>(v);
  }
  return sum_lanes(lanes);
}

// `len` pooled elements of a 2x2 stride-2 max pool into their two conv rows d0, d1 (pairs of columns).
template <typename scalar_t, typename acc_t>
inline void max2x2_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                       const uint8_t* __restrict__ code, int64_t len, scalar_t* __restrict__ d0,
                       scalar_t* __restrict__ d1, acc_t* __restrict__ lanes) {
  for (int64_t k = 0; k < len; ++k) {
    const scalar_t v = relu_gated<acc_t>(g[k], y[k]);
    const uint8_t c = code[k];
    d0[2 * k] = keep_if(v, c == 0);
    d0[2 * k + 1] = keep_if(v, c == 1);
    d1[2 * k] = keep_if(v, c == 2);
    d1[2 * k + 1] = keep_if(v, c == 3);
    lanes[k] += static_cast<acc_t>(v);
  }
}

// The 2x2 stride-2 max pool, the common case: pooled rows in runs of kLanes, then the remainder column and row.
template <typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES acc_t max2x2_plane(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                         const uint8_t* __restrict__ code, const Geometry& G,
                                         scalar_t* __restrict__ d) {
  const int64_t PH = G.PH, PW = G.PW, W = G.W;
  acc_t lanes[kLanes] = {};
  for (int64_t ph = 0; ph < PH; ++ph) {
    const int64_t p = ph * PW;
    scalar_t* d0 = d + 2 * ph * W;
    scalar_t* d1 = d0 + W;
    int64_t pw = 0;
    for (; pw + kLanes <= PW; pw += kLanes) {
      max2x2_run<scalar_t, acc_t>(g + p + pw, y + p + pw, code + p + pw, kLanes, d0 + 2 * pw, d1 + 2 * pw, lanes);
    }
    max2x2_run<scalar_t, acc_t>(g + p + pw, y + p + pw, code + p + pw, PW - pw, d0 + 2 * pw, d1 + 2 * pw, lanes);
    for (int64_t w = 2 * PW; w < W; ++w) d0[w] = d1[w] = scalar_t(0);
  }
  std::fill(d + 2 * PH * W, d + G.H * W, scalar_t(0));
  return sum_lanes(lanes);
}

// Any non-overlapping window, max or avg: conv row by conv row, each element once (sum in memory order).
template <PoolMode kMode, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES acc_t generic_plane(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                          const uint8_t* __restrict__ code, const Geometry& G,
                                          scalar_t* __restrict__ d) {
  const PoolWindow win = G.win;
  const acc_t inv_area = acc_t(1) / static_cast<acc_t>(win.area());
  acc_t sum = 0;
  for (int64_t ph = 0; ph < G.PH; ++ph) {
    for (int64_t h = ph * win.sh; h < G.band_end(ph); ++h) {
      scalar_t* row = d + h * G.W;
      const int64_t i = h - ph * win.sh;
      if (i >= win.kh) {
        std::fill(row, row + G.W, scalar_t(0));
        continue;
      }
      for (int64_t pw = 0; pw < G.PW; ++pw) {
        const int64_t p = ph * G.PW + pw;
        for (int64_t w = pw * win.sw; w < G.col_end(pw); ++w) {
          const int64_t j = w - pw * win.sw;
          const scalar_t v = j < win.kw ? routed<kMode, acc_t>(g[p], y[p], code[p], i * win.kw + j, inv_area)
                                        : scalar_t(0);
          row[w] = v;
          if constexpr (kMode == PoolMode::Avg) sum += static_cast<acc_t>(v);
        }
        // A max window's dz values sum to its gated g (one element gets it, or none): counted on its first row.
        if constexpr (kMode == PoolMode::Max) {
          if (i == 0) sum += static_cast<acc_t>(relu_gated<acc_t>(g[p], y[p]));
        }
      }
    }
  }
  return sum;
}

// --- NHWC: the conv rows of one pooled row (n, ph) per work unit; partial sums per channel added into part. ---
template <PoolMode kMode, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void band_nhwc(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                     const uint8_t* __restrict__ code, const Geometry& G, int64_t ph,
                                     scalar_t* __restrict__ d, acc_t* __restrict__ part) {
  const int64_t C = G.C, W = G.W;
  const PoolWindow win = G.win;
  const acc_t inv_area = acc_t(1) / static_cast<acc_t>(win.area());
  if constexpr (kMode != PoolMode::Avg) {  // the window's dz values sum to the gated g (one element, or none)
    for (int64_t pw = 0; pw < G.PW; ++pw) {
      for (int64_t c = 0; c < C; ++c) part[c] += static_cast<acc_t>(relu_gated<acc_t>(g[pw * C + c], y[pw * C + c]));
    }
  }
  const int64_t rows = G.band_end(ph) - ph * win.sh;
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = d + i * W * C;
    if (i >= win.kh) {
      std::fill(row, row + W * C, scalar_t(0));
      continue;
    }
    for (int64_t pw = 0; pw < G.PW; ++pw) {
      const scalar_t* gp = g + pw * C;
      const scalar_t* yp = y + pw * C;
      const uint8_t* cp = kMode == PoolMode::None ? nullptr : code + pw * C;
      for (int64_t w = pw * win.sw; w < G.col_end(pw); ++w) {
        scalar_t* __restrict__ dst = row + w * C;
        const int64_t j = w - pw * win.sw;
        if (j >= win.kw) {
          std::fill(dst, dst + C, scalar_t(0));
          continue;
        }
        const int64_t offset = i * win.kw + j;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t v = routed<kMode, acc_t>(gp[c], yp[c], cp == nullptr ? uint8_t(0) : cp[c], offset, inv_area);
          dst[c] = v;
          if constexpr (kMode == PoolMode::Avg) part[c] += static_cast<acc_t>(v);
        }
      }
    }
  }
}

// --- With a scale (z = conv * scale + bias): grad_conv = scale * dz and grad_scale = sum dz * conv, applied to a
// work unit's dz right after it is written, while it is still in cache. ---

// An NCHW plane of channel scale s: returns the plane's sum of dz * conv (conv nullptr: 0), in kLanes lanes.
template <typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES acc_t scale_plane(scalar_t* __restrict__ d, const scalar_t* __restrict__ conv, int64_t len,
                                        acc_t s) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  if (conv != nullptr) {
    for (; i + kLanes <= len; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t dz = static_cast<acc_t>(d[i + l]);
        lanes[l] += dz * static_cast<acc_t>(conv[i + l]);
        d[i + l] = static_cast<scalar_t>(dz * s);
      }
    }
    for (int64_t l = 0; i + l < len; ++l) {
      const acc_t dz = static_cast<acc_t>(d[i + l]);
      lanes[l] += dz * static_cast<acc_t>(conv[i + l]);
      d[i + l] = static_cast<scalar_t>(dz * s);
    }
    return sum_lanes(lanes);
  }
  for (; i < len; ++i) d[i] = static_cast<scalar_t>(static_cast<acc_t>(d[i]) * s);
  return acc_t(0);
}

// `pixels` NHWC pixels of C channels: d scaled per channel, part[c] += dz * conv (conv nullptr: no sums).
template <typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void scale_pixels(scalar_t* __restrict__ d, const scalar_t* __restrict__ conv, int64_t pixels,
                                        int64_t C, const acc_t* __restrict__ s, acc_t* __restrict__ part) {
  for (int64_t p = 0; p < pixels; ++p) {
    scalar_t* __restrict__ dp = d + p * C;
    if (conv != nullptr) {
      const scalar_t* __restrict__ cp = conv + p * C;
      for (int64_t c = 0; c < C; ++c) part[c] += static_cast<acc_t>(dp[c]) * static_cast<acc_t>(cp[c]);
    }
    for (int64_t c = 0; c < C; ++c) dp[c] = static_cast<scalar_t>(static_cast<acc_t>(dp[c]) * s[c]);
  }
}

// The scale inputs of one backward: per-channel scale (acc_t), the conv output in grad_conv's layout (nullptr when
// grad_scale is not wanted), and where grad_scale goes; scale == nullptr: no scale.
template <typename scalar_t, typename acc_t>
struct ScaleArgs {
  const acc_t* scale = nullptr;
  const scalar_t* conv = nullptr;
  at::Tensor* grad_scale = nullptr;
};

// Per-channel sums of the units' partial sums (part: units x C), added in unit order.
template <typename scalar_t, typename acc_t>
void merge_partials(const std::vector<acc_t>& part, int64_t units, int64_t C, at::Tensor& grad_bias) {
  std::vector<acc_t> total(C, acc_t(0));
  for (int64_t u = 0; u < units; ++u) {
    for (int64_t c = 0; c < C; ++c) total[c] += part[u * C + c];
  }
  if (grad_bias.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    scalar_t* dst = grad_bias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(total[c]);
  } else {  // grad_scale of an opmath scale: the sums as they are, in acc_t
    acc_t* dst = grad_bias.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) dst[c] = total[c];
  }
}

template <PoolMode kMode, typename scalar_t>
void scatter_kernel(const scalar_t* g, const scalar_t* y, const uint8_t* code, const Geometry& G, scalar_t* dst,
                    at::Tensor& grad_bias, const ScaleArgs<scalar_t, at::opmath_type<scalar_t>>& sa) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = G.C;
  const bool scale_sums = sa.conv != nullptr;
  if (!G.channels_last) {
    std::vector<acc_t> part(G.N * C);  // part[n * C + c]: plane (n, c)
    std::vector<acc_t> part_scale(scale_sums ? G.N * C : 0);
    const int64_t plane = G.H * G.W, pooled = G.PH * G.PW;
    at::parallel_for(0, G.N * C, grain_for(plane), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const scalar_t* gu = g + u * pooled;
        const scalar_t* yu = y + u * pooled;
        const uint8_t* cu = code == nullptr ? nullptr : code + u * pooled;
        scalar_t* du = dst + u * plane;
        if constexpr (kMode == PoolMode::None) {
          part[u] = relu_plane<scalar_t, acc_t>(gu, yu, plane, du);
        } else if constexpr (kMode == PoolMode::Max) {
          part[u] = G.is_2x2() ? max2x2_plane<scalar_t, acc_t>(gu, yu, cu, G, du)
                               : generic_plane<kMode, scalar_t, acc_t>(gu, yu, cu, G, du);
        } else {
          part[u] = generic_plane<kMode, scalar_t, acc_t>(gu, yu, cu, G, du);
        }
        if (sa.scale != nullptr) {
          const acc_t sum = scale_plane<scalar_t, acc_t>(du, scale_sums ? sa.conv + u * plane : nullptr, plane,
                                                         sa.scale[u % C]);
          if (scale_sums) part_scale[u] = sum;
        }
      }
    });
    if (grad_bias.numel() > 0) merge_partials<scalar_t>(part, G.N, C, grad_bias);
    if (scale_sums) merge_partials<scalar_t>(part_scale, G.N, C, *sa.grad_scale);
    return;
  }
  const int64_t bands = G.N * G.PH;
  std::vector<acc_t> part(bands * C, acc_t(0));  // part[(n * PH + ph) * C + c]
  std::vector<acc_t> part_scale(scale_sums ? bands * C : 0, acc_t(0));
  at::parallel_for(0, bands, grain_for(G.win.sh * G.W * C), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / G.PH, ph = u % G.PH;
      const int64_t p = u * G.PW * C, first = (n * G.H + ph * G.win.sh) * G.W * C;
      band_nhwc<kMode, scalar_t, acc_t>(g + p, y + p, code == nullptr ? nullptr : code + p, G, ph, dst + first,
                                        part.data() + u * C);
      if (sa.scale != nullptr) {
        const int64_t pixels = (G.band_end(ph) - ph * G.win.sh) * G.W;
        scale_pixels<scalar_t, acc_t>(dst + first, scale_sums ? sa.conv + first : nullptr, pixels, C, sa.scale,
                                      scale_sums ? part_scale.data() + u * C : nullptr);
      }
    }
  });
  if (grad_bias.numel() > 0) merge_partials<scalar_t>(part, bands, C, grad_bias);
  if (scale_sums) merge_partials<scalar_t>(part_scale, bands, C, *sa.grad_scale);
}

// Overlapping windows: each conv element gathers, in a fixed order, the pooled gradients of every window containing
// it that routes to it. Work unit: one (n, c, h) conv row.
template <typename scalar_t>
void gather_kernel(const scalar_t* g, const scalar_t* y, const uint8_t* codes, PoolMode mode, const Geometry& G,
                   scalar_t* dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto pooled_at = [&](int64_t n, int64_t c, int64_t ph, int64_t pw) {
    return G.channels_last ? ((n * G.PH + ph) * G.PW + pw) * G.C + c : ((n * G.C + c) * G.PH + ph) * G.PW + pw;
  };
  const auto conv_at = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return G.channels_last ? ((n * G.H + h) * G.W + w) * G.C + c : ((n * G.C + c) * G.H + h) * G.W + w;
  };
  at::parallel_for(0, G.N * G.C * G.H, grain_for(G.W * G.win.area()), [&](int64_t begin, int64_t end) {
    for (int64_t nch = begin; nch < end; ++nch) {
      const int64_t h = nch % G.H, c = (nch / G.H) % G.C, n = nch / (G.H * G.C);
      int64_t ph0, ph1;
      windows_containing(h, G.win.kh, G.win.sh, G.PH, ph0, ph1);
      for (int64_t w = 0; w < G.W; ++w) {
        int64_t pw0, pw1;
        windows_containing(w, G.win.kw, G.win.sw, G.PW, pw0, pw1);
        acc_t sum = 0;
        for (int64_t ph = ph0; ph <= ph1; ++ph) {
          for (int64_t pw = pw0; pw <= pw1; ++pw) {
            const int64_t at = pooled_at(n, c, ph, pw);
            const int64_t offset = (h - ph * G.win.sh) * G.win.kw + (w - pw * G.win.sw);
            const bool routes = mode == PoolMode::Max ? codes[at] == offset && relu_passes(static_cast<acc_t>(y[at]))
                                                      : ((codes[at] >> offset) & 1) != 0;
            if (routes) sum += static_cast<acc_t>(g[at]);
          }
        }
        if (mode == PoolMode::Avg) sum /= static_cast<acc_t>(G.win.area());
        dst[conv_at(n, c, h, w)] = static_cast<scalar_t>(sum);
      }
    }
  });
}

// Per-channel sum of a dense conv-sized tensor in fixed units (NCHW planes, NHWC pixel rows of one (n, h)).
template <typename scalar_t>
void channel_sums(const scalar_t* x, const Geometry& G, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = G.C, units = G.N * (G.channels_last ? G.H : 1);
  std::vector<acc_t> part(units * C, acc_t(0));
  at::parallel_for(0, G.channels_last ? units : G.N * C, grain_for(G.channels_last ? G.W * C : G.H * G.W),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t u = begin; u < end; ++u) {
                       if (G.channels_last) {
                         for (int64_t w = 0; w < G.W; ++w) {
                           for (int64_t c = 0; c < C; ++c) part[u * C + c] += static_cast<acc_t>(x[(u * G.W + w) * C + c]);
                         }
                       } else {
                         acc_t s = 0;
                         for (int64_t i = 0; i < G.H * G.W; ++i) s += static_cast<acc_t>(x[u * G.H * G.W + i]);
                         part[u] = s;
                       }
                     }
                   });
  merge_partials<scalar_t>(part, units, C, grad_bias);
}

// The scale applied to a dense grad_conv in its own pass (the overlapping windows' path), in the units of
// channel_sums: NCHW planes, NHWC rows of one (n, h).
template <typename scalar_t>
void scale_pass(scalar_t* d, const Geometry& G, const ScaleArgs<scalar_t, at::opmath_type<scalar_t>>& sa) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = G.C, plane = G.H * G.W, units = G.channels_last ? G.N * G.H : G.N * C;
  const int64_t unit = G.channels_last ? G.W * C : plane;
  const bool scale_sums = sa.conv != nullptr;
  std::vector<acc_t> part(scale_sums ? (G.channels_last ? units * C : units) : 0, acc_t(0));
  at::parallel_for(0, units, grain_for(unit), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const scalar_t* conv = scale_sums ? sa.conv + u * unit : nullptr;
      if (G.channels_last) {
        scale_pixels<scalar_t, acc_t>(d + u * unit, conv, G.W, C, sa.scale, scale_sums ? part.data() + u * C : nullptr);
      } else {
        const acc_t sum = scale_plane<scalar_t, acc_t>(d + u * unit, conv, unit, sa.scale[u % C]);
        if (scale_sums) part[u] = sum;
      }
    }
  });
  if (scale_sums) merge_partials<scalar_t>(part, G.channels_last ? units : G.N, C, *sa.grad_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_relu_pool_backward_scaled_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& code_in, c10::SymIntArrayRef conv_size,
    c10::string_view pool, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool bias_grad,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& conv) {
  EpilogueBackward b = prepare_epilogue_backward(grad_out_in, out_in, code_in, conv_size, pool, pool_size,
                                                 pool_stride, bias_grad, scale, conv);
  const PoolMode mode = b.mode;
  const Geometry G{b.fmt == at::MemoryFormat::ChannelsLast, b.out.size(0), b.out.size(1), b.H, b.W, b.out.size(2),
                   b.out.size(3), mode == PoolMode::None ? PoolWindow{1, 1, 1, 1} : b.win};
  if (b.grad_conv.numel() == 0) {
    if (bias_grad) b.grad_bias.zero_();
    if (b.grad_scale.defined()) b.grad_scale.zero_();
    return {b.grad_conv, b.grad_bias, b.grad_scale.defined() ? b.grad_scale : b.out.new_empty({0})};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.out.scalar_type(), "bias_relu_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = b.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* y = b.out.const_data_ptr<scalar_t>();
    const uint8_t* codes = mode == PoolMode::None ? nullptr : b.code.const_data_ptr<uint8_t>();
    scalar_t* dst = b.grad_conv.mutable_data_ptr<scalar_t>();
    ScaleArgs<scalar_t, acc_t> sa;
    if (b.scale.defined()) {
      sa.scale = b.scale.const_data_ptr<acc_t>();
      if (b.conv.defined()) {
        sa.conv = b.conv.const_data_ptr<scalar_t>();
        sa.grad_scale = &b.grad_scale;
      }
    }
    if (G.overlapping()) {
      gather_kernel<scalar_t>(g, y, codes, mode, G, dst);
      if (bias_grad) channel_sums<scalar_t>(dst, G, b.grad_bias);
      if (sa.scale != nullptr) scale_pass<scalar_t>(dst, G, sa);
    } else if (mode == PoolMode::Max) {
      scatter_kernel<PoolMode::Max, scalar_t>(g, y, codes, G, dst, b.grad_bias, sa);
    } else if (mode == PoolMode::Avg) {
      scatter_kernel<PoolMode::Avg, scalar_t>(g, y, codes, G, dst, b.grad_bias, sa);
    } else {
      scatter_kernel<PoolMode::None, scalar_t>(g, y, codes, G, dst, b.grad_bias, sa);
    }
  });
  return {b.grad_conv, b.grad_bias, b.grad_scale.defined() ? b.grad_scale : b.out.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bias_relu_pool_backward", &unscaled_backward<&bias_relu_pool_backward_scaled_cpu>);
  m.impl("bias_relu_pool_scaled_backward", &bias_relu_pool_backward_scaled_cpu);
}

}  // namespace fastcnn
