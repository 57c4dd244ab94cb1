// The pieces of the CPU Winograd F(2x2, 3x3) convolution that its forward (winograd.cpp) and its weight gradient
// (winograd_backward.cpp) share (csrc/cpu/): the tile geometry, the plan of blocks, the layout of the 16 positions
// in scratch and the input transform.
#pragma once

#include <ATen/ATen.h>

#include "fastcnn/cpu_loops.h"

// The Fortran BLAS sgemm of the library torch links (MKL on x86 builds), weak so that a torch built without one
// still loads fastcnn; then the GEMMs go through at::mm_out.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace fastcnn {
namespace winograd_tiles {

struct Geometry {
  int64_t N, C, K, H, W, ph, pw, HO, WO, TH, TW;  // C in, K out; TH x TW tiles of 2x2 outputs per image
  int64_t tiles() const { return N * TH * TW; }
};

// Where a scratch buffer's 16 positions lie: q_stride floats apart.
struct Positions {
  float* data;
  int64_t q_stride;
  float* at(int q) const { return data + q * q_stride; }
};

// A q stride of at least `floats` that is not a multiple of 1 KB: the 16 positions of one row then fall in different
// L1 sets (at multiples of 4 KB, as 98 tiles x 512 channels are, they would all evict each other).
inline int64_t spread(int64_t floats) {
  const int64_t lines = (floats + 15) / 16 * 16;
  return lines % 256 == 0 ? lines + 16 : lines;
}

// One call's tiles and its blocks of them.
struct Plan {
  Geometry g;
  at::Tensor input;  // channels_last
  int64_t block, blocks;
};

// The tiles and blocks of a 3x3 convolution of input (C channels) into K channels.
Plan tile_plan(const at::Tensor& input_in, int64_t C, int64_t K, at::IntArrayRef padding);

// V[q][t][c] = (B^T d B)[q] (positions q_stride apart) for the tiles [t0, t0 + nb) of an NHWC input; taps outside
// the image read `zero`.
FASTCNN_VECTOR_CLONES void input_transform(const float* __restrict__ in, const Geometry& g, int64_t t0, int64_t nb,
                                           int64_t q_stride, const float* __restrict__ zero, float* __restrict__ V);

}  // namespace winograd_tiles
}  // namespace fastcnn
