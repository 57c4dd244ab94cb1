// The filter transform of the CPU Winograd F(2x2, 3x3) forward (winograd.cpp): U_q = (G g G^T)[q] for each 3x3
// filter g, read in place from the weight (winograd_filters.cpp).
#pragma once

#include <ATen/ATen.h>

#include "fastcnn/winograd_tiles.h"

namespace fastcnn {
namespace winograd_filters {

// The filters g(k, c) = weight[k][c], or, flipped, weight[c][k] turned by 180 degrees, read in place from an OIHW
// or a channels_last weight (any other layout is copied to OIHW first).
struct FilterSource {
  at::Tensor weight;
  const float* data;  // tap 0 of g(0, 0)
  int64_t in_stride, out_stride, tap_stride;  // between the filters' input channels c, output channels k, and taps
  // Whether U_q is written (K x C), transposed, rather than (C x K): the transform's lanes run along the filters'
  // closer axis, c where the input channels are nearer each other (OIHW 9 floats apart, channels_last 1), k where
  // the output channels are (the flipped filters of the input gradient).
  bool transposed;

  // The filters of weight (C_out, C_in, 3, 3); flip: those of the input gradient.
  FilterSource(const at::Tensor& weight, bool flip);

  // U_q for every channel c < C and the filters [k0, k0 + n), into U, which holds the filters [first, first +
  // width) at each position: (C x width) row-major, or transposed (width x C).
  void transform(int64_t C, int64_t k0, int64_t n, winograd_tiles::Positions U, int64_t first, int64_t width) const;
};

// U of every filter (C x K, or transposed K x C, at each position), for the blocks of tiles.
void transform_filters(const FilterSource& filters, int64_t C, int64_t K, winograd_tiles::Positions U);

}  // namespace winograd_filters
}  // namespace fastcnn
