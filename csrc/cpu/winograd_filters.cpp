// The filter transform of the CPU Winograd F(2x2, 3x3) forward (winograd.cpp, whose header comment gives G):
// U = G g G^T for every 3x3 filter g, taken straight from an OIHW or channels_last weight, vectorised along the
// filters' nearer axis.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "fastcnn/cpu_loops.h"
#include "fastcnn/winograd_filters.h"

#include <algorithm>

namespace fastcnn {
namespace winograd_filters {

using winograd_tiles::Positions;

namespace {

constexpr int64_t kTapRow = 64;  // filters transformed at a time

// Row i of U = t G^T from row i of t = G g, for lane l (the 16 positions are q_stride apart in U).
__attribute__((always_inline)) inline void filter_row_out(float* __restrict__ u, int64_t q_stride, int64_t l, int i,
                                                          float t0, float t1, float t2) {
  u[(i * 4 + 0) * q_stride + l] = t0;
  u[(i * 4 + 1) * q_stride + l] = 0.5f * (t0 + t1 + t2);
  u[(i * 4 + 2) * q_stride + l] = 0.5f * (t0 - t1 + t2);
  u[(i * 4 + 3) * q_stride + l] = t2;
}

// u[q * q_stride + l] = (G g_l G^T)[q] for the n filters g_l whose tap (a, b) is f[l * lane_stride + (a * 3 + b) *
// tap_stride], vectorised along l (the taps are gathered from the weight as they are read: no transposed copy).
// (The transforms keep their values in named scalars: a private array in a vectorised loop body becomes per-lane
// memory.)
FASTCNN_VECTOR_CLONES void filter_transform(const float* __restrict__ f, int64_t lane_stride, int64_t tap_stride,
                                            int64_t n, float* __restrict__ u, int64_t q_stride) {
#pragma omp simd  // U's rows do not overlap the weight (the vectoriser cannot prove it across the strides)
  for (int64_t l = 0; l < n; ++l) {
    const float* t = f + l * lane_stride;
    const float g00 = t[0], g01 = t[tap_stride], g02 = t[2 * tap_stride];
    const float g10 = t[3 * tap_stride], g11 = t[4 * tap_stride], g12 = t[5 * tap_stride];
    const float g20 = t[6 * tap_stride], g21 = t[7 * tap_stride], g22 = t[8 * tap_stride];
    // t = G g, row by row
    filter_row_out(u, q_stride, l, 0, g00, g01, g02);
    filter_row_out(u, q_stride, l, 1, 0.5f * (g00 + g10 + g20), 0.5f * (g01 + g11 + g21), 0.5f * (g02 + g12 + g22));
    filter_row_out(u, q_stride, l, 2, 0.5f * (g00 - g10 + g20), 0.5f * (g01 - g11 + g21), 0.5f * (g02 - g12 + g22));
    filter_row_out(u, q_stride, l, 3, g20, g21, g22);
  }
}

}  // namespace

FilterSource::FilterSource(const at::Tensor& weight_in, bool flip) {
  const bool taps_in_place = weight_in.stride(2) == 3 * weight_in.stride(3);
  weight = taps_in_place ? weight_in : weight_in.contiguous();
  in_stride = flip ? weight.stride(0) : weight.stride(1);
  out_stride = flip ? weight.stride(1) : weight.stride(0);
  // Turned by 180 degrees, tap (a, b) is the weight's (2 - a, 2 - b): read backwards from the last.
  tap_stride = flip ? -weight.stride(3) : weight.stride(3);
  data = weight.const_data_ptr<float>() + (flip ? 8 * weight.stride(3) : 0);
  transposed = in_stride < out_stride;
}

void FilterSource::transform(int64_t C, int64_t k0, int64_t n, Positions U, int64_t first, int64_t width) const {
  if (transposed) {
    for (int64_t k = 0; k < n; ++k) {
      filter_transform(data + (k0 + k) * out_stride, in_stride, tap_stride, C, U.data + (k0 - first + k) * C,
                       U.q_stride);
    }
    return;
  }
  for (int64_t kk = 0; kk < n; kk += kTapRow) {  // kTapRow filters at a time, whose taps stay in L1
    const int64_t nk = std::min(kTapRow, n - kk);
    for (int64_t c = 0; c < C; ++c) {
      filter_transform(data + c * in_stride + (k0 + kk) * out_stride, out_stride, tap_stride, nk,
                       U.data + c * width + k0 - first + kk, U.q_stride);
    }
  }
}

// U of every filter (C x K, or transposed K x C, at each position), for the blocks of tiles.
void transform_filters(const FilterSource& filters, int64_t C, int64_t K, Positions U) {
  const int64_t chunks = (K + kTapRow - 1) / kTapRow;
  at::parallel_for(0, chunks, grain_for(9 * C * kTapRow), [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t k0 = chunk * kTapRow;
      filters.transform(C, k0, std::min(kTapRow, K - k0), U, /*first=*/0, /*width=*/K);
    }
  });
}

}  // namespace winograd_filters
}  // namespace fastcnn
