// The CPU 3x3 convolution (stride 1) by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms
// for Convolutional Neural Networks", 2016): each 2x2 output tile is
//     Y = A^T [ (G g G^T) .* (B^T d B) ] A
// with d the tile's 4x4 input patch, g the 3x3 filter and
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//     A^T = [1 1 1 0; 0 1 -1 -1].
// Summed over input channels, the 16 elementwise products become 16 GEMMs, M_q = V_q U_q (q: the 4x4 position),
// with V_q (tiles x C_in) the transformed inputs and U_q (C_in x C_out) the transformed filters: 16 multiplications
// per 2x2 tile and channel pair where the direct convolution does 36 (2.25x fewer), done by the BLAS that torch
// links (MKL's sgemm on x86).
//
// Work is cut into tasks of at::parallel_for whose GEMMs run on the task's thread: blocks of tiles (input transform,
// 16 GEMMs and output transform back to back while V and M are still in cache) where the filters are narrow, columns
// of output channels where they are wide (run_columns: U is then made and read once). The transforms use only
// additions, subtractions and halvings, and the error measured against float64 is below that of oneDNN's
// channels_last direct convolution (tests/ops/test_winograd.py). The filter transform is in winograd_filters.cpp,
// the backward in winograd_backward.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include "fastcnn/checks.h"
#include "fastcnn/cpu_loops.h"
#include "fastcnn/winograd.h"
#include "fastcnn/winograd_filters.h"
#include "fastcnn/winograd_tiles.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>


namespace fastcnn {

using namespace winograd_tiles;
using winograd_filters::FilterSource;

namespace {

// Where it runs (conv block forward and forward+backward, batch 2, 2 threads, against the direct convolution):
// - channels_last input. Its error against float64 (relative RMS 2-4.4e-7 for 64-512 channels) is below oneDNN's
//   channels_last convolution's (3-11e-7), but above oneDNN's NCHW one (1.2-1.9e-7) by more than the benchmarks'
//   accuracy rule allows (twice stock's error plus one epsilon: the input gradient of 256 -> 256 at 56x56 failed it).
//   The fused block's forward with a 2x2 max pool passes it (2.1-3.9e-7 against 4.8-5.1e-7 allowed, VGG-16 blocks
//   1-5) and runs on NCHW input too (winograd_fits, csrc/conv_relu_pool.cpp).
// - at least 64 channels on both sides (fewer leave the GEMMs too short);
// - enough work for its plan (run_forward below):
//   - wide filters (C_in * C_out >= 256 * 256) and up to 1024 tiles run by columns of output channels, from 96 tiles
//     up. Measured with the caches evicted, fused block forward against stock, NCHW / channels_last: 98 tiles
//     1.38 / 1.38x at 512 channels, 1.40 / 1.34x at 256; 196 tiles 1.55-1.63 / 1.40-1.53x; 392 tiles at 512
//     channels 1.68 / 1.63x (1.14 / 1.14x by blocks of tiles); but 49 tiles 1.04 / 0.94x at 512 channels.
//   - the others by blocks of tiles, from 256 tiles and tiles * C_in * C_out >= 2^21 up: each block reads all of U
//     (16 * C_in * C_out floats), so the work must amortise it (on an older machine 64 channels at 200 tiles gave
//     0.97x, 392 1.08x, 800 1.37x, warm).
constexpr int64_t kMinChannels = 64, kMinTiles = 256, kMinWork = int64_t{1} << 21;
constexpr int64_t kMinColumnFilters = 256 * 256, kMinColumnTiles = 96, kMaxColumnTiles = 1024;

bool by_columns(int64_t tiles, int64_t C, int64_t K) { return tiles <= kMaxColumnTiles && C * K >= kMinColumnFilters; }

}  // namespace

namespace winograd_tiles {

// Row i of (B^T d) B from row i of r = B^T d.
__attribute__((always_inline)) inline void input_row_out(float* __restrict__ v, int64_t q_stride, int64_t c, int i,
                                                         float r0, float r1, float r2, float r3) {
  v[(i * 4 + 0) * q_stride + c] = r0 - r2;
  v[(i * 4 + 1) * q_stride + c] = r1 + r2;
  v[(i * 4 + 2) * q_stride + c] = r2 - r1;
  v[(i * 4 + 3) * q_stride + c] = r1 - r3;
}

// V[q][t][c] = (B^T d B)[q] (positions q_stride apart) for the tiles [t0, t0 + nb) of an NHWC input; taps outside
// the image read `zero`.
FASTCNN_VECTOR_CLONES void input_transform(const float* __restrict__ in, const Geometry& g, int64_t t0, int64_t nb,
                                           int64_t q_stride, const float* __restrict__ zero, float* __restrict__ V) {
  const int64_t C = g.C;
  for (int64_t tt = 0; tt < nb; ++tt) {
    const int64_t t = t0 + tt, tx = t % g.TW, ty = (t / g.TW) % g.TH, n = t / (g.TW * g.TH);
    const float* d[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * ty - g.ph + i, x = 2 * tx - g.pw + j;
        d[i][j] = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? in + ((n * g.H + y) * g.W + x) * C : zero;
      }
    }
    float* __restrict__ v = V + tt * C;
    // `omp simd`: the rows of V written do not overlap the input rows read, which the vectoriser cannot prove
    // through the array of pointers.
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      // r = B^T d, column by column, then (B^T d) B row by row
      const float d00 = d[0][0][c], d01 = d[0][1][c], d02 = d[0][2][c], d03 = d[0][3][c];
      const float d10 = d[1][0][c], d11 = d[1][1][c], d12 = d[1][2][c], d13 = d[1][3][c];
      const float d20 = d[2][0][c], d21 = d[2][1][c], d22 = d[2][2][c], d23 = d[2][3][c];
      const float d30 = d[3][0][c], d31 = d[3][1][c], d32 = d[3][2][c], d33 = d[3][3][c];
      input_row_out(v, q_stride, c, 0, d00 - d20, d01 - d21, d02 - d22, d03 - d23);
      input_row_out(v, q_stride, c, 1, d10 + d20, d11 + d21, d12 + d22, d13 + d23);
      input_row_out(v, q_stride, c, 2, d20 - d10, d21 - d11, d22 - d12, d23 - d13);
      input_row_out(v, q_stride, c, 3, d10 - d30, d11 - d31, d12 - d32, d13 - d33);
    }
  }
}

}  // namespace winograd_tiles

namespace {

// One tile's 2x2 outputs at one channel.
struct TileOut {
  float y00, y01, y10, y11;
};

// (A^T M A) at channel k of one tile; M's 16 values of channel k are q_stride apart. (Returned by value: an array
// whose address a vectorised loop body takes would become a per-lane array in memory.)
__attribute__((always_inline)) inline TileOut tile_outputs(const float* __restrict__ m, int64_t q_stride, int64_t k) {
  float left[4], right[4];  // M A, row by row
  for (int i = 0; i < 4; ++i) {
    left[i] = m[(i * 4 + 0) * q_stride + k] + m[(i * 4 + 1) * q_stride + k] + m[(i * 4 + 2) * q_stride + k];
    right[i] = m[(i * 4 + 1) * q_stride + k] - m[(i * 4 + 2) * q_stride + k] - m[(i * 4 + 3) * q_stride + k];
  }
  return {left[0] + left[1] + left[2], right[0] + right[1] + right[2], left[1] - left[2] - left[3],
          right[1] - right[2] - right[3]};
}

// 1 where one of a tile's outputs is not finite (their sum times zero is then NaN), else 0: the output transforms
// below OR it into an integer flag, which the vectoriser reduces without reassociating floating-point sums, and
// return false where it is set.
__attribute__((always_inline)) inline uint32_t not_finite(const TileOut& y) {
  return static_cast<uint32_t>((y.y00 + y.y01 + y.y10 + y.y11) * 0.0f != 0.0f);
}

// The fused max pool's step: relu(y + bias) (rounded once, as the epilogue's) against the running max `best`, taken
// where greater or NaN, `offset` its window offset; 32-bit masks (blend) keep the loop in one lane width.
__attribute__((always_inline)) inline void pool_step(float y, float bias, uint32_t j, float& best, uint32_t& offset) {
  const float z = y + bias;
  const float v = keep_if(z, relu_passes(z));
  const uint32_t take = -static_cast<uint32_t>((v > best) | (v != v));
  best = blend(take, v, best);
  offset = (j & take) | (offset & ~take);
}

// The output channels [k0, k0 + n) that one M holds (rows of n values): all K for a block of tiles, a slice of them
// for a column of the filters (run_columns).
struct Columns {
  int64_t k0, n;
};

// out = A^T M A for the tiles [t0, t0 + nb), written NHWC; outputs past an odd edge are dropped. M's positions are
// q_stride apart.
FASTCNN_VECTOR_CLONES bool output_transform(const float* __restrict__ M, int64_t q_stride, const Geometry& g,
                                            int64_t t0, int64_t nb, Columns cols, float* __restrict__ tile,
                                            float* __restrict__ out) {
  const int64_t n = cols.n;
  uint32_t nonfinite = 0;
  for (int64_t tt = 0; tt < nb; ++tt) {
    const int64_t t = t0 + tt, tx = t % g.TW, ty = (t / g.TW) % g.TH, image = t / (g.TW * g.TH);
    const float* __restrict__ m = M + tt * n;
    for (int64_t k = 0; k < n; ++k) {
      const TileOut y = tile_outputs(m, q_stride, k);
      tile[k] = y.y00;
      tile[n + k] = y.y01;
      tile[2 * n + k] = y.y10;
      tile[3 * n + k] = y.y11;
      nonfinite |= not_finite(y);
    }
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        const int64_t y = 2 * ty + a, x = 2 * tx + b;
        if (y < g.HO && x < g.WO) std::memcpy(out + ((image * g.HO + y) * g.WO + x) * g.K + cols.k0,
                                              tile + (a * 2 + b) * n, n * sizeof(float));
      }
    }
  }
  return nonfinite == 0;
}

// The fused block's epilogue on the tiles [t0, t0 + nb): a 2x2 tile is exactly one window of the 2x2 stride-2 max
// pool, so relu(y + bias) and its max are taken in registers and only the pooled value and its code are written -
// the same values, in the same order and rounding, as fastcnn::bias_relu_pool on the stored convolution (the max
// starts below every ReLU output and takes v where v > best or v is NaN; the code is the window offset). Tiles past
// an odd edge feed no window.
FASTCNN_VECTOR_CLONES bool output_relu_maxpool(const float* __restrict__ M, int64_t q_stride, const Geometry& g,
                                               int64_t t0, int64_t nb, Columns cols,
                                               const float* __restrict__ bias_all, uint32_t* __restrict__ offsets,
                                               float* __restrict__ out, uint8_t* __restrict__ code) {
  const int64_t n = cols.n, PH = g.HO / 2, PW = g.WO / 2;
  const float* __restrict__ bias = bias_all + cols.k0;
  uint32_t nonfinite = 0;
  for (int64_t tt = 0; tt < nb; ++tt) {
    const int64_t t = t0 + tt, tx = t % g.TW, ty = (t / g.TW) % g.TH, image = t / (g.TW * g.TH);
    if (ty >= PH || tx >= PW) continue;
    const float* __restrict__ m = M + tt * n;
    const int64_t window = ((image * PH + ty) * PW + tx) * g.K + cols.k0;
    float* __restrict__ o = out + window;
    // The offsets are narrowed to the uint8 code in a second loop, so that the first keeps one lane width.
    for (int64_t k = 0; k < n; ++k) {
      const TileOut y = tile_outputs(m, q_stride, k);
      nonfinite |= not_finite(y);
      float best = -1.0f;  // below every ReLU output
      uint32_t offset = 0;
      pool_step(y.y00, bias[k], 0, best, offset);
      pool_step(y.y01, bias[k], 1, best, offset);
      pool_step(y.y10, bias[k], 2, best, offset);
      pool_step(y.y11, bias[k], 3, best, offset);
      o[k] = best;
      offsets[k] = offset;
    }
    uint8_t* __restrict__ c = code + window;
    for (int64_t k = 0; k < n; ++k) c[k] = static_cast<uint8_t>(offsets[k]);
  }
  return nonfinite == 0;
}

// M_q = V_q U_q for the 16 positions q: V_q (nb x C), U_q (C x n, or stored transposed: n x C) and M_q (nb x n)
// row-major. A row-major product is the column-major product of the transposes, M_q^T = U_q^T V_q^T, which is how
// BLAS sees it.
void tile_gemms(Positions U, bool u_transposed, Positions V, int64_t C, int64_t n, int64_t nb, Positions M) {
  for (int q = 0; q < 16; ++q) {
    const float* u = U.at(q);
    const float* v = V.at(q);
    float* m = M.at(q);
    if (sgemm_ != nullptr) {
      const int ni = static_cast<int>(n), nbi = static_cast<int>(nb), Ci = static_cast<int>(C);
      const float one = 1.0f, zero = 0.0f;
      sgemm_(u_transposed ? "T" : "N", "N", &ni, &nbi, &Ci, &one, u, u_transposed ? &Ci : &ni, v, &Ci, &zero, m,
             &ni);
    } else {
      const auto options = at::TensorOptions().dtype(at::kFloat);
      at::Tensor mt = at::from_blob(m, {nb, n}, options);
      const at::Tensor ut = u_transposed ? at::from_blob(const_cast<float*>(u), {n, C}, options).t()
                                         : at::from_blob(const_cast<float*>(u), {C, n}, options);
      at::mm_out(mt, at::from_blob(const_cast<float*>(v), {nb, C}, options), ut);
    }
  }
}

}  // namespace

bool winograd_fits(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const bool shape_fits = input.device().is_cpu() && input.scalar_type() == at::kFloat &&
                          weight.scalar_type() == at::kFloat && input.dim() == 4 && weight.dim() == 4 &&
                          weight.size(2) == 3 && weight.size(3) == 3 && groups == 1 && stride[0] == 1 &&
                          stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1 && padding[0] >= 0 &&
                          padding[0] <= 2 && padding[1] >= 0 && padding[1] <= 2 && input.size(1) == weight.size(1);
  if (!shape_fits) return false;
  const int64_t HO = input.size(2) + 2 * padding[0] - 2, WO = input.size(3) + 2 * padding[1] - 2;
  if (HO < 1 || WO < 1) return false;
  const int64_t tiles = input.size(0) * ((HO + 1) / 2) * ((WO + 1) / 2);
  const int64_t C = weight.size(1), K = weight.size(0);
  if (std::min(C, K) < kMinChannels) return false;
  return by_columns(tiles, C, K) ? tiles >= kMinColumnTiles : tiles >= kMinTiles && tiles * C * K >= kMinWork;
}

bool winograd_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return memory_format_of(input) == at::MemoryFormat::ChannelsLast &&
         winograd_fits(input, weight, stride, padding, dilation, groups);
}

namespace winograd_tiles {

Plan tile_plan(const at::Tensor& input_in, int64_t C, int64_t K, at::IntArrayRef padding) {
  TORCH_CHECK(input_in.scalar_type() == at::kFloat && input_in.dim() == 4 && input_in.size(1) == C,
              "fastcnn: winograd: expected float32 (N, ", C, ", H, W) input, got ", input_in.sizes());
  Plan p;
  p.input = input_in.contiguous(at::MemoryFormat::ChannelsLast);
  Geometry& g = p.g;
  g = {p.input.size(0), C, K, p.input.size(2), p.input.size(3), padding[0], padding[1], 0, 0, 0, 0};
  g.HO = g.H + 2 * g.ph - 2;
  g.WO = g.W + 2 * g.pw - 2;
  TORCH_CHECK(g.HO >= 1 && g.WO >= 1, "fastcnn: winograd_conv3x3: the input is smaller than the kernel");
  g.TH = (g.HO + 1) / 2;
  g.TW = (g.WO + 1) / 2;
  // Tiles per block, measured (conv block forward, 2 threads, blocks of 16 to 256 tiles interleaved): 64 where
  // C + K >= 512 (512 channels: 24.2 ms at 64, 27.0 at 32, 26.3 at 256), else 128 (128 channels: 19.9 ms at 128,
  // 23.4 at 64; 64 channels: 27.4 at 128, 31.4 at 256) - longer GEMMs against V and M spilling from L2. The block
  // count is then rounded up to a multiple of 4 and the tiles evened out over it, so that 1, 2 or 4 threads get
  // whole shares (a 4-3 split of 7 blocks on 2 threads costs an eighth). The split depends on the shapes only, not
  // on the thread count, so a GEMM's size does not either. Results repeat bitwise at a thread count; across thread
  // counts they were bitwise the same with MKL's AVX-512 kernels, but its AVX2 ones differed in the last bits at 3
  // threads (tested within the tolerance table).
  const int64_t max_block = C + K >= 512 ? 64 : 128, blocks = (g.tiles() + max_block - 1) / max_block;
  p.blocks = (blocks + 3) / 4 * 4;
  p.block = (g.tiles() + p.blocks - 1) / p.blocks;
  return p;
}

}  // namespace winograd_tiles

namespace {

// One forward call: its tiles and its filters.
struct Forward {
  Plan tiles;
  FilterSource filters;
};

Forward plan_forward(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding, bool flip_weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "fastcnn: winograd_conv3x3 takes a float32 (C_out, C_in, 3, 3) weight");
  const int64_t C = flip_weight ? weight.size(0) : weight.size(1), K = flip_weight ? weight.size(1) : weight.size(0);
  return {tile_plan(input, C, K, padding), FilterSource(weight, flip_weight)};
}

// Per-task scratch of the output transforms: one tile's outputs (4 x n) or one pooled row's window offsets (n).
struct OutputScratch {
  std::vector<float> tile;
  std::vector<uint32_t> offsets;
  explicit OutputScratch(int64_t n) : tile(4 * n), offsets(n) {}
};

// Many tiles: U of every filter first, then blocks of tiles, one task each, whose input transform, 16 GEMMs and
// finish(M, t0, nb, columns, scratch) - which writes the block's outputs and returns false where one is not
// finite - run back to back while its V and M are still in cache. Returns whether all outputs were finite.
template <typename Finish>
bool run_tile_blocks(const Forward& f, const Finish& finish) {
  const Plan& p = f.tiles;
  const Geometry& g = p.g;
  const int64_t u_stride = spread(g.C * g.K), v_stride = spread(p.block * g.C), m_stride = spread(p.block * g.K);
  std::unique_ptr<float[]> u_data(new float[16 * u_stride]);  // uninitialised: written before read
  const Positions u{u_data.get(), u_stride};
  winograd_filters::transform_filters(f.filters, g.C, g.K, u);
  const float* in = p.input.const_data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zero(g.C, 0.0f);
    std::unique_ptr<float[]> scratch(new float[16 * (v_stride + m_stride)]);  // uninitialised: written before read
    OutputScratch out_scratch(g.K);
    const Positions V{scratch.get(), v_stride}, M{scratch.get() + 16 * v_stride, m_stride};
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t0 = b * p.block, nb = std::min(p.block, g.tiles() - t0);
      if (nb <= 0) break;
      input_transform(in, g, t0, nb, v_stride, zero.data(), V.data);
      tile_gemms(u, f.filters.transposed, V, g.C, g.K, nb, M);
      if (!finish(M, t0, nb, Columns{0, g.K}, out_scratch)) finite.store(false);
    }
  });
  return finite.load();
}

// Wide filters over up to 1024 tiles (VGG-16's block5 at batch 2: 98 tiles, 512 x 512 filters): there each block of
// tiles would read all of U (16 * C * K floats, 16 MB), which costs more than the GEMMs save (block5: 0.86x oneDNN's
// NCHW forward, 0.72x its channels_last one). So the filters are split instead: V of every tile first (16 * tiles * C
// floats, 3.2 MB there), then columns of output channels, one task each, which transforms its filters (reading the
// weight once in all, as the direct convolution does), multiplies every tile's V by them and finishes its channels
// of every tile. Columns of up to 128 channels, at least two of them so that two threads share the work; measured
// at block5 (forward, caches evicted, interleaved against stock): 32 channels 1.21 / 1.18x (NCHW / channels_last),
// 64 1.27 / 1.24x, 128 1.38-1.43 / 1.33-1.36x, 256 1.48 / 1.41x - longer GEMMs - but 256 leaves one thread idle at
// 256 channels (0.91x).
constexpr int64_t kMaxColumnWidth = 128;

int64_t column_width(int64_t K) { return std::min(kMaxColumnWidth, ((K + 1) / 2 + 15) / 16 * 16); }

template <typename Finish>
bool run_columns(const Forward& f, const Finish& finish) {
  const Geometry& g = f.tiles.g;
  const int64_t T = g.tiles(), C = g.C, width = column_width(g.K);
  const int64_t u_stride = spread(C * width), v_stride = spread(T * C), m_stride = spread(T * width);
  const float* in = f.tiles.input.const_data_ptr<float>();
  std::unique_ptr<float[]> v_data(new float[16 * v_stride]);  // uninitialised: written before read
  const Positions V{v_data.get(), v_stride};
  at::parallel_for(0, T, grain_for(16 * C), [&](int64_t begin, int64_t end) {
    std::vector<float> zero(C, 0.0f);
    input_transform(in, g, begin, end - begin, v_stride, zero.data(), V.data + begin * C);
  });
  const int64_t columns = (g.K + width - 1) / width;
  std::atomic<bool> finite{true};
  at::parallel_for(0, columns, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(new float[16 * (u_stride + m_stride)]);
    const Positions U{scratch.get(), u_stride}, M{scratch.get() + 16 * u_stride, m_stride};
    OutputScratch out_scratch(width);
    for (int64_t column = begin; column < end; ++column) {
      const Columns cols{column * width, std::min(width, g.K - column * width)};
      f.filters.transform(C, cols.k0, cols.n, U, /*first=*/cols.k0, /*width=*/cols.n);
      tile_gemms(U, f.filters.transposed, V, C, cols.n, T, M);
      if (!finish(M, 0, T, cols, out_scratch)) finite.store(false);
    }
  });
  return finite.load();
}

template <typename Finish>
bool run_forward(const Forward& f, const Finish& finish) {
  const Geometry& g = f.tiles.g;
  return by_columns(g.tiles(), g.C, g.K) ? run_columns(f, finish) : run_tile_blocks(f, finish);
}

}  // namespace

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding,
                            bool flip_weight) {
  RECORD_FUNCTION("fastcnn::winograd_conv3x3", std::vector<c10::IValue>({input, weight}));  // named in profiles
  const Forward f = plan_forward(input, weight, padding, flip_weight);
  const Plan& p = f.tiles;
  const Geometry& g = p.g;
  at::Tensor out = at::empty({g.N, g.K, g.HO, g.WO}, p.input.options().memory_format(at::MemoryFormat::ChannelsLast));
  float* dst = out.mutable_data_ptr<float>();
  const bool finite = run_forward(f, [&](Positions M, int64_t t0, int64_t nb, Columns cols, OutputScratch& scratch) {
    return output_transform(M.data, M.q_stride, g, t0, nb, cols, scratch.tile.data(), dst);
  });
  if (finite) return out;
  // A non-finite input or weight: the transforms subtract, so one infinity becomes NaN (inf - inf) in outputs where
  // the direct convolution gives +-inf; such calls (rare) run the direct convolution, whose results stock's match.
  // The flipped convolution with padding p' is the transposed convolution with padding 2 - p'.
  const std::array<int64_t, 2> direct_padding = flip_weight ? std::array<int64_t, 2>{2 - g.ph, 2 - g.pw}
                                                            : std::array<int64_t, 2>{g.ph, g.pw};
  return at::convolution(p.input, weight, c10::nullopt, {1, 1}, direct_padding, {1, 1}, /*transposed=*/flip_weight,
                         {0, 0}, 1)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

std::optional<std::tuple<at::Tensor, at::Tensor>> winograd_conv3x3_relu_maxpool(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef padding) {
  RECORD_FUNCTION("fastcnn::winograd_conv3x3", std::vector<c10::IValue>({input, weight}));
  const Forward f = plan_forward(input, weight, padding, /*flip_weight=*/false);
  const Plan& p = f.tiles;
  const Geometry& g = p.g;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous()
                                                           : at::zeros({g.K}, p.input.options());
  TORCH_CHECK(b.numel() == g.K, "fastcnn: bias must have ", g.K, " elements, got ", b.numel());
  const auto options = p.input.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({g.N, g.K, g.HO / 2, g.WO / 2}, options);
  at::Tensor code = at::empty({g.N, g.K, g.HO / 2, g.WO / 2}, options.dtype(at::kByte));
  const float* bias_data = b.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  uint8_t* codes = code.mutable_data_ptr<uint8_t>();
  const bool finite = run_forward(f, [&](Positions M, int64_t t0, int64_t nb, Columns cols, OutputScratch& scratch) {
    return output_relu_maxpool(M.data, M.q_stride, g, t0, nb, cols, bias_data, scratch.offsets.data(), dst, codes);
  });
  if (!finite) return std::nullopt;
  return std::make_tuple(out, code);
}

}  // namespace fastcnn
