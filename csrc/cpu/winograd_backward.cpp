// The backward of the CPU Winograd F(2x2, 3x3) convolution (winograd.cpp): its weight gradient by Winograd's
// F(3x3, 2x2), and convolution_backward_winograd, which picks Winograd's or ATen's input and weight gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include "fastcnn/checks.h"
#include "fastcnn/cpu_loops.h"
#include "fastcnn/winograd.h"
#include "fastcnn/winograd_tiles.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <tuple>
#include <vector>

namespace fastcnn {

using namespace winograd_tiles;

namespace {

// The weight gradient has two plans for the sum over tiles. Narrow filters (up to 256 x 256): each thread adds its
// blocks' 16 GEMMs into its own dU (16 * C_in * C_out floats), summed after; with caches evicted before each call
// (weight gradient alone, VGG-16 shapes, batch 2) it won at 128 channels (18 ms against oneDNN's 26) and 256 (22
// against 26.5), but lost at 512 (37-42 against 31-35), where every block's GEMMs read and write 16 MB a thread.
// Wide filters: the transforms of a chunk of up to kWideChunkTiles tiles are written first, then each of the 16
// GEMMs reduces over the whole chunk into the one dU, one position per task, so dU is read and written once a chunk.
constexpr int64_t kMaxNarrowFilters = 256 * 256, kWideChunkTiles = 512;

// Where it runs: where the forward's rule holds (winograd_fits) with at least 128 channels on both sides. Weight
// gradient alone, caches evicted, VGG-16 block shapes at batch 2, on a machine whose float32 matmul runs 0.46 TFLOP/s
// (benchmarks' ceilings): Winograd from NCHW / channels_last input against oneDNN's in the same layout at 64
// channels (224 px) 31 / 25 ms against 22 / 22 - at so few channels its transforms (a pass over the input and the
// gradient per tile) weigh more against the GEMMs - at 128 (112 px) 17.4 / 12.9 against 18.6 / 18.2, at 256 (56
// px) 19.0 / 15.2 against 20.8 / 19.2, at 512 (28 px) 13.6 / 11.8 against 18.5 / 22.5 and at 512 (14 px, by the
// forward's column rule) 4.5 / 4.0 against 5.5 / 10.9. (A slower machine, 0.16 TFLOP/s, had 64 channels win
// narrowly from NCHW: 84 against 88 ms.)
constexpr int64_t kMinWeightGradChannels = 128;

bool weight_grad_fits(const at::Tensor& weight) {
  return std::min(weight.size(0), weight.size(1)) >= kMinWeightGradChannels;
}

// --- The weight gradient, by Winograd's F(3x3, 2x2): the forward Y = A^T [U .* V] A with U = G g G^T gives, per
// tile and channel pair, dL/dU = (A dY A^T) .* V, so that summed over tiles
//     dU_q[c][k] = sum_t V_q[t][c] dM_q[t][k]   with dM = A dY A^T (16 GEMMs per block of tiles),
//     dg = G^T dU G.

// Row i of (A dY) A^T from row i of r = A dY (r has two columns).
__attribute__((always_inline)) inline void grad_row_out(float* __restrict__ dm, int64_t q_stride, int64_t k, int i,
                                                        float r0, float r1) {
  dm[(i * 4 + 0) * q_stride + k] = r0;
  dm[(i * 4 + 1) * q_stride + k] = r0 + r1;
  dm[(i * 4 + 2) * q_stride + k] = r0 - r1;
  dm[(i * 4 + 3) * q_stride + k] = -r1;
}

// dM[q][t][k] = (A dY A^T)[q] for the tiles [t0, t0 + nb) of an NHWC gradient dy (N, HO, WO, K); outputs past an
// odd edge read `zero`.
FASTCNN_VECTOR_CLONES void grad_transform(const float* __restrict__ dy, const Geometry& g, int64_t t0, int64_t nb,
                                          int64_t block, const float* __restrict__ zero, float* __restrict__ dM) {
  const int64_t K = g.K, q_stride = block * K;
  for (int64_t tt = 0; tt < nb; ++tt) {
    const int64_t t = t0 + tt, tx = t % g.TW, ty = (t / g.TW) % g.TH, n = t / (g.TW * g.TH);
    const float* y[2][2];
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        const int64_t oy = 2 * ty + a, ox = 2 * tx + b;
        y[a][b] = (oy < g.HO && ox < g.WO) ? dy + ((n * g.HO + oy) * g.WO + ox) * K : zero;
      }
    }
    float* __restrict__ dm = dM + tt * K;
#pragma omp simd  // the rows of dM written do not overlap the gradient rows read
    for (int64_t k = 0; k < K; ++k) {
      const float y00 = y[0][0][k], y01 = y[0][1][k], y10 = y[1][0][k], y11 = y[1][1][k];
      grad_row_out(dm, q_stride, k, 0, y00, y01);  // r = A dY, row by row
      grad_row_out(dm, q_stride, k, 1, y00 + y10, y01 + y11);
      grad_row_out(dm, q_stride, k, 2, y00 - y10, y01 - y11);
      grad_row_out(dm, q_stride, k, 3, -y10, -y11);
    }
  }
}

// dU_q (+)= dM_q^T V_q over nb tiles at position q: dU_q (K x C) row-major, which BLAS (column-major) sees as
// dU_q^T = V_q^T dM_q with V_q (nb x C) and dM_q (nb x K) row-major; beta 0 overwrites, 1 adds.
void weight_grad_gemm(const float* v, const float* dm, int64_t nb, int64_t C, int64_t K, float beta, float* du) {
  if (sgemm_ != nullptr) {
    const int c = static_cast<int>(C), k = static_cast<int>(K), n = static_cast<int>(nb);
    const float one = 1.0f;
    sgemm_("N", "T", &c, &k, &n, &one, v, &c, dm, &k, &beta, du, &c);
  } else {
    const auto options = at::TensorOptions().dtype(at::kFloat);
    at::Tensor target = at::from_blob(du, {K, C}, options);
    target.addmm_(at::from_blob(const_cast<float*>(dm), {nb, K}, options).t(),
                  at::from_blob(const_cast<float*>(v), {nb, C}, options), beta);
  }
}

// dU[q][k][c] summed over every tile, each thread adding its blocks into its own copy, summed after (narrow filters).
at::Tensor weight_grad_per_thread(const Plan& p, const float* dy) {
  const Geometry& g = p.g;
  at::Tensor partial = at::zeros({at::get_num_threads(), 16, g.K, g.C}, p.input.options());
  const float* in = p.input.const_data_ptr<float>();
  float* partial_data = partial.mutable_data_ptr<float>();
  const int64_t block = p.block;
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zero(std::max(g.C, g.K), 0.0f), scratch(16 * block * (g.C + g.K));
    float* V = scratch.data();
    float* dM = V + 16 * block * g.C;
    float* dU = partial_data + at::get_thread_num() * 16 * g.K * g.C;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t0 = b * block, nb = std::min(block, g.tiles() - t0);
      if (nb <= 0) break;
      input_transform(in, g, t0, nb, block * g.C, zero.data(), V);
      grad_transform(dy, g, t0, nb, block, zero.data(), dM);
      for (int q = 0; q < 16; ++q) {
        weight_grad_gemm(V + q * block * g.C, dM + q * block * g.K, nb, g.C, g.K, 1.0f, dU + q * g.K * g.C);
      }
    }
  });
  return partial.sum(0);
}

// dU[q][k][c] summed over every tile chunk by chunk, each position's GEMM reducing over a whole chunk (wide filters).
at::Tensor weight_grad_by_chunks(const Plan& p, const float* dy) {
  const Geometry& g = p.g;
  const int64_t chunk = std::min(g.tiles(), kWideChunkTiles), C = g.C, K = g.K;
  at::Tensor dU = at::empty({16, K, C}, p.input.options());
  std::vector<float> zero(std::max(C, K), 0.0f), scratch(16 * chunk * (C + K));
  float* V = scratch.data();  // V[q][t][c] and dM[q][t][k] of the chunk's tiles
  float* dM = V + 16 * chunk * C;
  const float* in = p.input.const_data_ptr<float>();
  float* du = dU.mutable_data_ptr<float>();
  for (int64_t t0 = 0; t0 < g.tiles(); t0 += chunk) {
    const int64_t n = std::min(chunk, g.tiles() - t0);
    at::parallel_for(0, n, p.block, [&](int64_t begin, int64_t end) {
      input_transform(in, g, t0 + begin, end - begin, chunk * C, zero.data(), V + begin * C);
      grad_transform(dy, g, t0 + begin, end - begin, chunk, zero.data(), dM + begin * K);
    });
    at::parallel_for(0, 16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        weight_grad_gemm(V + q * chunk * C, dM + q * chunk * K, n, C, K, t0 == 0 ? 0.0f : 1.0f, du + q * K * C);
      }
    });
  }
  return dU;
}

// Row a of dg = (G^T dU) G from row a of s = G^T dU, written at taps[(a * 3 + b) * C + c]; returns 1 where one of
// the three values is not finite (their sum times zero is then NaN), else 0.
__attribute__((always_inline)) inline uint32_t weight_row_out(float* __restrict__ taps, int64_t C, int64_t c, int a,
                                                              float s0, float s1, float s2, float s3) {
  const float half_sum = 0.5f * (s1 + s2);
  const float w0 = s0 + half_sum, w1 = 0.5f * (s1 - s2), w2 = half_sum + s3;
  taps[(a * 3 + 0) * C + c] = w0;
  taps[(a * 3 + 1) * C + c] = w1;
  taps[(a * 3 + 2) * C + c] = w2;
  return static_cast<uint32_t>((w0 + w1 + w2) * 0.0f != 0.0f);
}

// dg[k][tap][c] = (G^T dU_{k,c} G)[tap] for one output channel k into taps (9 x C): du holds dU[q][k][c], q_stride
// apart, c < C. Returns nonzero where a value is not finite.
FASTCNN_VECTOR_CLONES uint32_t weight_back_transform(const float* __restrict__ du, int64_t q_stride, int64_t C,
                                                     float* __restrict__ taps) {
  uint32_t nonfinite = 0;
#pragma omp simd reduction(| : nonfinite)
  for (int64_t c = 0; c < C; ++c) {
    const float* f = du + c;
    const float u00 = f[0], u01 = f[q_stride], u02 = f[2 * q_stride], u03 = f[3 * q_stride];
    const float u10 = f[4 * q_stride], u11 = f[5 * q_stride], u12 = f[6 * q_stride], u13 = f[7 * q_stride];
    const float u20 = f[8 * q_stride], u21 = f[9 * q_stride], u22 = f[10 * q_stride], u23 = f[11 * q_stride];
    const float u30 = f[12 * q_stride], u31 = f[13 * q_stride], u32 = f[14 * q_stride], u33 = f[15 * q_stride];
    // s = G^T dU, column by column: rows u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3
    nonfinite |= weight_row_out(taps, C, c, 0, u00 + 0.5f * (u10 + u20), u01 + 0.5f * (u11 + u21),
                                u02 + 0.5f * (u12 + u22), u03 + 0.5f * (u13 + u23));
    nonfinite |= weight_row_out(taps, C, c, 1, 0.5f * (u10 - u20), 0.5f * (u11 - u21), 0.5f * (u12 - u22),
                                0.5f * (u13 - u23));
    nonfinite |= weight_row_out(taps, C, c, 2, 0.5f * (u10 + u20) + u30, 0.5f * (u11 + u21) + u31,
                                0.5f * (u12 + u22) + u32, 0.5f * (u13 + u23) + u33);
  }
  return nonfinite;
}

}  // namespace

at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef padding,
                                        at::MemoryFormat weight_format) {
  RECORD_FUNCTION("fastcnn::winograd_conv3x3_weight_grad", std::vector<c10::IValue>({grad_out, input}));
  const int64_t C = input.size(1), K = grad_out.size(1);
  const Plan p = tile_plan(input, C, K, padding);
  const Geometry& g = p.g;
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.dim() == 4 && grad_out.size(0) == g.N &&
                  grad_out.size(2) == g.HO && grad_out.size(3) == g.WO,
              "fastcnn: winograd_conv3x3_weight_grad: grad_out of shape ", grad_out.sizes(), " does not match the ",
              "convolution's output (", g.N, ", ", K, ", ", g.HO, ", ", g.WO, ")");
  const at::Tensor dy = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor dU = C * K <= kMaxNarrowFilters ? weight_grad_per_thread(p, dy.const_data_ptr<float>())
                                                   : weight_grad_by_chunks(p, dy.const_data_ptr<float>());
  // The back transform writes each output channel's taps as (3, 3, C), which is the channels_last filter's own
  // layout; a contiguous filter gets each channel's 9 x C block transposed from a scratch row.
  at::Tensor grad_weight = at::empty({K, C, 3, 3}, p.input.options().memory_format(weight_format));
  const bool taps_last = weight_format == at::MemoryFormat::ChannelsLast;
  const float* du = dU.const_data_ptr<float>();
  float* w = grad_weight.mutable_data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, K, grain_for(16 * C), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(taps_last ? 0 : 9 * C);
    uint32_t nonfinite = 0;
    for (int64_t k = begin; k < end; ++k) {
      float* taps = taps_last ? w + k * 9 * C : scratch.data();
      nonfinite |= weight_back_transform(du + k * C, K * C, C, taps);
      if (!taps_last) {
        for (int64_t c = 0; c < C; ++c) {
          for (int tap = 0; tap < 9; ++tap) w[(k * C + c) * 9 + tap] = taps[tap * C + c];
        }
      }
    }
    if (nonfinite != 0) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load() ? grad_weight : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> convolution_backward_winograd(const at::Tensor& grad_conv, const at::Tensor& input,
                                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 int64_t groups, std::array<bool, 2> output_mask) {
  at::Tensor grad_input, grad_weight;
  // The weight gradient is Winograd's wherever its rule holds (weight_grad_fits), NCHW too (through channels_last
  // copies). Its error against float64 (relative RMS, VGG-16 blocks 1-4 at batch 2 behind a ReLU and max pool: 4.1
  // / 3.2 / 2.4 / 3.4e-7 at 64 / 128 / 256 / 512 channels) is below oneDNN's NCHW one (1.9e-6 / 9.6 / 6.8 / 3.4e-7)
  // and within the benchmarks' rule of oneDNN's channels_last one (7.7 / 3.9 / 2.8 / 1.5e-7). The input gradient is
  // Winograd's on channels_last input only: on NCHW its error (4.4e-7 at 512 channels) is more than the benchmarks'
  // rule allows against oneDNN's NCHW one (1.5e-7).
  const bool fits = (output_mask[0] || output_mask[1]) &&
                    winograd_fits(input, weight, stride, padding, dilation, groups);
  if (fits && output_mask[0] && memory_format_of(input) == at::MemoryFormat::ChannelsLast) {
    grad_input = winograd_conv3x3(grad_conv, weight, {2 - padding[0], 2 - padding[1]}, /*flip_weight=*/true);
  }
  if (fits && output_mask[1] && weight_grad_fits(weight)) {
    // Undefined where a value is not finite: the transforms subtract, so one infinity can become NaN (inf - inf)
    // where the direct sum gives +-inf; such calls (rare) run ATen's, whose results stock's match.
    grad_weight = winograd_conv3x3_weight_grad(grad_conv, input, padding, memory_format_of(weight));
  }
  const bool aten_input = output_mask[0] && !grad_input.defined();
  const bool aten_weight = output_mask[1] && !grad_weight.defined();
  if (aten_input || aten_weight) {
    auto [aten_grad_input, aten_grad_weight, unused_grad_bias] = at::convolution_backward(
        grad_conv, input, weight, /*bias_sizes=*/c10::nullopt, stride, padding, dilation, /*transposed=*/false,
        /*output_padding=*/{0, 0}, groups, {aten_input, aten_weight, false});
    if (aten_input) grad_input = aten_grad_input;
    if (aten_weight) grad_weight = aten_grad_weight;
  }
  return {grad_input, grad_weight};
}

}  // namespace fastcnn
