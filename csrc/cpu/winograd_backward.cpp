// The backward of the CPU Winograd F(2x2, 3x3) convolution (winograd.cpp): its weight gradient by Winograd's
// F(3x3, 2x2), and convolution_backward_winograd, which picks Winograd's or ATen's input and weight gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include "fastcnn/cpu_loops.h"
#include "fastcnn/winograd.h"
#include "fastcnn/winograd_tiles.h"

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

namespace fastcnn {

using namespace winograd_tiles;

namespace {

// The weight gradient accumulates 16 * C_in * C_out floats per thread, every block's 16 GEMMs reading and writing
// them: with caches evicted before each call (weight gradient alone, VGG-16 shapes, batch 2) it won at 128 channels
// (18 ms against oneDNN's 26) and 256 (22 against 26.5), tied at 64 and lost at 512 (37-42 against 31-35), where
// those accumulators are 16 MB a thread. So it runs up to 256 x 256 filters.
constexpr int64_t kMaxWeightGradFilters = 256 * 256;

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

// dU_q += V_q^T dM_q for the 16 positions q: dU_q (C x K) row-major; as BLAS sees it (column-major),
// dU_q^T += dM_q^T V_q.
void weight_grad_gemms(const float* V, const float* dM, const Geometry& g, int64_t nb, int64_t block, float* dU) {
  for (int q = 0; q < 16; ++q) {
    const float* v = V + q * block * g.C;
    const float* dm = dM + q * block * g.K;
    float* du = dU + q * g.C * g.K;
    if (sgemm_ != nullptr) {
      const int K = static_cast<int>(g.K), n = static_cast<int>(nb), C = static_cast<int>(g.C);
      const float one = 1.0f;
      sgemm_("N", "T", &K, &C, &n, &one, dm, &K, v, &C, &one, du, &K);
    } else {
      const auto options = at::TensorOptions().dtype(at::kFloat);
      at::from_blob(du, {g.C, g.K}, options)
          .addmm_(at::from_blob(const_cast<float*>(v), {nb, g.C}, options).t(),
                  at::from_blob(const_cast<float*>(dm), {nb, g.K}, options));
    }
  }
}

// Row a of dg = (G^T dU) G from row a of s = G^T dU.
__attribute__((always_inline)) inline void weight_row_out(float* __restrict__ w, int64_t tap_stride, int64_t k, int a,
                                                          float s0, float s1, float s2, float s3) {
  const float half_sum = 0.5f * (s1 + s2);
  w[(a * 3 + 0) * tap_stride + k] = s0 + half_sum;
  w[(a * 3 + 1) * tap_stride + k] = 0.5f * (s1 - s2);
  w[(a * 3 + 2) * tap_stride + k] = half_sum + s3;
}

// dg[tap][c][k] = (G^T dU_{c,k} G)[tap] for one input channel c: du holds dU[q][c][k] q_stride apart, k < K.
FASTCNN_VECTOR_CLONES void weight_back_transform(const float* __restrict__ du, int64_t q_stride, int64_t K,
                                                 float* __restrict__ w, int64_t tap_stride) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    const float* f = du + k;
    const float u00 = f[0], u01 = f[q_stride], u02 = f[2 * q_stride], u03 = f[3 * q_stride];
    const float u10 = f[4 * q_stride], u11 = f[5 * q_stride], u12 = f[6 * q_stride], u13 = f[7 * q_stride];
    const float u20 = f[8 * q_stride], u21 = f[9 * q_stride], u22 = f[10 * q_stride], u23 = f[11 * q_stride];
    const float u30 = f[12 * q_stride], u31 = f[13 * q_stride], u32 = f[14 * q_stride], u33 = f[15 * q_stride];
    // s = G^T dU, column by column: rows u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3
    weight_row_out(w, tap_stride, k, 0, u00 + 0.5f * (u10 + u20), u01 + 0.5f * (u11 + u21),
                   u02 + 0.5f * (u12 + u22), u03 + 0.5f * (u13 + u23));
    weight_row_out(w, tap_stride, k, 1, 0.5f * (u10 - u20), 0.5f * (u11 - u21), 0.5f * (u12 - u22),
                   0.5f * (u13 - u23));
    weight_row_out(w, tap_stride, k, 2, 0.5f * (u10 + u20) + u30, 0.5f * (u11 + u21) + u31,
                   0.5f * (u12 + u22) + u32, 0.5f * (u13 + u23) + u33);
  }
}

}  // namespace

at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& grad_out, const at::Tensor& input,
                                        at::IntArrayRef padding) {
  RECORD_FUNCTION("fastcnn::winograd_conv3x3_weight_grad", std::vector<c10::IValue>({grad_out, input}));
  const int64_t C = input.size(1), K = grad_out.size(1);
  const Plan p = tile_plan(input, C, K, padding);
  const Geometry& g = p.g;
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.dim() == 4 && grad_out.size(0) == g.N &&
                  grad_out.size(2) == g.HO && grad_out.size(3) == g.WO,
              "fastcnn: winograd_conv3x3_weight_grad: grad_out of shape ", grad_out.sizes(), " does not match the ",
              "convolution's output (", g.N, ", ", K, ", ", g.HO, ", ", g.WO, ")");
  const at::Tensor dy = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  // One dU accumulator per thread (each GEMM adds into its thread's), summed after.
  const int threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, 16, C, K}, p.input.options());
  const float* in = p.input.const_data_ptr<float>();
  const float* dy_data = dy.const_data_ptr<float>();
  float* partial_data = partial.mutable_data_ptr<float>();
  const int64_t block = p.block;
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zero(std::max(C, K), 0.0f), scratch(16 * block * (C + K));
    float* V = scratch.data();
    float* dM = V + 16 * block * C;
    float* dU = partial_data + at::get_thread_num() * 16 * C * K;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t0 = b * block, nb = std::min(block, g.tiles() - t0);
      if (nb <= 0) break;
      input_transform(in, g, t0, nb, block, zero.data(), V);
      grad_transform(dy_data, g, t0, nb, block, zero.data(), dM);
      weight_grad_gemms(V, dM, g, nb, block, dU);
    }
  });
  const at::Tensor dU = partial.sum(0);
  at::Tensor taps = at::empty({9, C, K}, p.input.options());  // dg[tap][c][k]
  const float* du = dU.const_data_ptr<float>();
  float* w = taps.mutable_data_ptr<float>();
  at::parallel_for(0, C, grain_for(16 * K), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) weight_back_transform(du + c * K, C * K, K, w + c * K, C * K);
  });
  return taps.permute({2, 1, 0}).reshape({K, C, 3, 3});
}

std::tuple<at::Tensor, at::Tensor> convolution_backward_winograd(const at::Tensor& grad_conv, const at::Tensor& input,
                                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 int64_t groups, std::array<bool, 2> output_mask) {
  at::Tensor grad_input, grad_weight;
  const bool winograd = (output_mask[0] || output_mask[1]) &&
                        winograd_applies(input, weight, stride, padding, dilation, groups);
  if (winograd && output_mask[0]) {
    grad_input = winograd_conv3x3(grad_conv, weight, {2 - padding[0], 2 - padding[1]}, /*flip_weight=*/true);
  }
  if (winograd && output_mask[1] && weight.size(0) * weight.size(1) <= kMaxWeightGradFilters) {
    grad_weight = winograd_conv3x3_weight_grad(grad_conv, input, padding);
    // A non-finite value: the transforms subtract, so one infinity can become NaN (inf - inf) where the direct
    // sum gives +-inf; such calls (rare) run ATen's, whose results stock's match.
    if (!grad_weight.isfinite().all().item<bool>()) grad_weight = at::Tensor();
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
