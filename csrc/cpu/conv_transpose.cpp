// CPU kernel of the transposed convolution's stride-phase store (the math is in fastcnn/conv_transpose.h): one pass
// in the output's memory order that reads each phase result once, adds the bias, applies the activation and writes
// every output element once. Rows are the contiguous runs of the output: NHWC the C_out channels of one pixel (one
// phase per pixel, and unit stride in the phase tensor when it is channel-last, so the loop vectorises), NCHW the OW
// pixels of one (n, c, oy) row, written phase column by phase column (every sw-th pixel from one phase row, unit
// stride in the GEMM path's phases). Index arithmetic is per pixel (NHWC) or per phase column (NCHW), never per
// element, and the ReLU is a bit select, so the inner loops vectorise. No atomics; deterministic.
// Also the whole kernel == stride forward for channels_last input (gemm_forward_channels_last_cpu, at the end): the
// GEMM written straight into the output rows, the bias and ReLU applied while they are in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <memory>
#include <type_traits>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"
#include "fastcnn/cpu_loops.h"

// BLAS torch links (gemm_forward_channels_last_cpu below), weak: a torch without one still loads.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastcnn {
namespace {

// act(x + b) rounded to scalar_t after the add, the ReLU (kRelu) as a bit select so that the loops vectorise: the
// same value as bias_act (fastcnn/conv_transpose.h) without its branch.
template <bool kRelu, typename scalar_t, typename acc_t>
inline scalar_t store_value(acc_t x, acc_t b) {
  const scalar_t v = static_cast<scalar_t>(x + b);
  return kRelu ? keep_if(v, !(static_cast<acc_t>(v) <= acc_t(0))) : v;
}

// NHWC: one output pixel's C channels from one phase pixel, channels `cs` apart (1 for the GEMM path's phases).
template <bool kRelu, bool kUnit, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void store_pixel(const scalar_t* __restrict__ src, int64_t cs, const acc_t* __restrict__ b,
                                       int64_t C, scalar_t* __restrict__ dst) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t x = src == nullptr ? acc_t(0) : static_cast<acc_t>(src[kUnit ? c : c * cs]);
    dst[c] = store_value<kRelu, scalar_t>(x, b[c]);
  }
}

// NCHW: the outputs ox = ox0, ox0 + sw, ... (count of them) of one row, from one phase row read `us` apart (1 for
// the GEMM path's phases), the first `valid` of them from the phase and the rest (past the phase's end) bias only.
template <bool kRelu, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void store_phase_column(const scalar_t* __restrict__ src, int64_t us, int64_t valid,
                                              int64_t count, int64_t sw, acc_t b, scalar_t* __restrict__ dst) {
  if (us == 1 && sw == 2) {  // the common k2s2 upsampling: constant strides, so the loop vectorises
    for (int64_t k = 0; k < valid; ++k) dst[2 * k] = store_value<kRelu, scalar_t>(static_cast<acc_t>(src[k]), b);
  } else {
    for (int64_t k = 0; k < valid; ++k) dst[k * sw] = store_value<kRelu, scalar_t>(static_cast<acc_t>(src[k * us]), b);
  }
  for (int64_t k = valid; k < count; ++k) dst[k * sw] = store_value<kRelu, scalar_t>(acc_t(0), b);
}

template <bool kRelu, typename scalar_t>
void phase_store_kernel(const PhaseTable<scalar_t>& table, const at::Tensor& bias, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), OH = out.size(2), OW = out.size(3);
  const auto os = out.strides();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const at::Tensor b_t = bias.defined() ? bias.to(at::toOpMathType(out.scalar_type())).contiguous()
                                        : at::zeros({C}, out.options().dtype(at::toOpMathType(out.scalar_type())));
  const acc_t* b = b_t.const_data_ptr<acc_t>();
  const int64_t sh = table.stride_h, sw = table.stride_w;
  if (memory_format_of(out) == at::MemoryFormat::ChannelsLast) {
    at::parallel_for(0, N * OH * OW, grain_for(C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t ox = r % OW, oy = (r / OW) % OH, n = r / (OW * OH);
        const int64_t ay = oy + table.pad_h, ax = ox + table.pad_w;
        const int64_t phase = (ay % sh) * sw + ax % sw;
        const int64_t t = ay / sh, u = ax / sw;
        const scalar_t* p = table.data[phase];
        scalar_t* dst = o + n * os[0] + oy * os[2] + ox * os[3];
        const int64_t* s = table.strides[phase];
        const bool reached = p != nullptr && t < table.len_h[phase] && u < table.len_w[phase];
        const scalar_t* src = reached ? p + n * s[0] + t * s[2] + u * s[3] : nullptr;
        if (reached && s[1] == 1) {
          store_pixel<kRelu, true>(src, 1, b, C, dst);
        } else {
          store_pixel<kRelu, false>(src, reached ? s[1] : 0, b, C, dst);
        }
      }
    });
    return;
  }
  // NCHW: row (n, c, oy) reads one row t of the phases (rh, 0..sw-1); phase column rw holds the outputs
  // ox = ox0 + k sw with ox0 = (rw - pad_w) mod sw, at u = (ox0 + pad_w) / sw + k.
  at::parallel_for(0, N * C * OH, grain_for(OW), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t oy = r % OH, c = (r / OH) % C, n = r / (OH * C);
      const int64_t ay = oy + table.pad_h, rh = ay % sh, t = ay / sh;
      scalar_t* dst = o + n * os[0] + c * os[1] + oy * os[2];
      for (int64_t rw = 0; rw < sw; ++rw) {
        const int64_t ox0 = ((rw - table.pad_w) % sw + sw) % sw;
        if (ox0 >= OW) continue;
        const int64_t count = (OW - ox0 + sw - 1) / sw, u0 = (ox0 + table.pad_w) / sw;
        const int64_t phase = rh * sw + rw;
        const scalar_t* p = table.data[phase];
        const int64_t* s = table.strides[phase];
        const bool row_reached = p != nullptr && t < table.len_h[phase];
        const int64_t valid = row_reached ? std::clamp<int64_t>(table.len_w[phase] - u0, 0, count) : 0;
        const scalar_t* src = row_reached ? p + n * s[0] + c * s[1] + t * s[2] + u0 * s[3] : nullptr;
        store_phase_column<kRelu, scalar_t, acc_t>(src, row_reached ? s[3] : 1, valid, count, sw, b[c],
                                                   dst + ox0 * os[3]);
      }
    }
  });
}

}  // namespace

void phase_store_bias_act_cpu(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                              std::array<int64_t, 2> stride, std::array<int64_t, 2> padding, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "phase_store_bias_act_cpu", [&] {
    const auto table = make_phase_table<scalar_t>(phases, stride, padding);
    relu ? phase_store_kernel<true, scalar_t>(table, bias, out) : phase_store_kernel<false, scalar_t>(table, bias, out);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// kernel == stride, channels_last, no padding. The input is an (N*H*W) x C_in matrix and G = input x weight, with the
// weight as [C_in, KH, KW, C_out], holds in row (n, h, w) the output pixels (h * KH + ky, w * KW + kx) of every tap:
// output row oy = h * KH + ky, read as [W, KW * C_out], is the ky-th column block of G's rows (n, h, 0..W-1), unit
// stride. So G is computed a block of input rows at a time into a per-thread buffer of about kGemmRows x
// KH * KW * C_out (cache-sized, where the general path writes a GEMM buffer the size of the output and reads it
// back from memory), and each block's output rows are written from it with the bias and activation. BLAS is called
// directly (sgemm_/dgemm_ of the BLAS torch links, weak so that a torch without one still loads and takes the
// general path): an ATen op in at::parallel_for's worker threads would run without the caller's thread-local state
// (grad mode, inference mode).

namespace {

constexpr int64_t kGemmRows = 256;  // GEMM rows (input pixels) per block: enough to amortise BLAS's packing

// Input rows (n, h) per block: about kGemmRows pixels, with the block count rounded up to a multiple of 4 and the
// rows evened out over it, so that 1, 2 or 4 threads get whole shares (U-Net's 2x512->256 at 28 px made 7 blocks,
// of 9 rows and a last of 2, 4 on one thread and 3 on the other: 0.88x stock's forward). The split depends on the
// shapes only.
int64_t rows_per_block(int64_t rows, int64_t W) {
  const int64_t target = std::max<int64_t>(1, kGemmRows / std::max<int64_t>(W, 1));
  const int64_t blocks = ((rows + target - 1) / target + 3) / 4 * 4;
  return std::max<int64_t>(1, (rows + blocks - 1) / blocks);
}

// Row-major Y[M, Nc] = X[M, K] * B[K, Nc] (row strides ldx, ldb, ldy), as the column-major Y^T = B^T X^T.
template <typename scalar_t>
void gemm_rows(int M, int Nc, int K, const scalar_t* x, int ldx, const scalar_t* b, int ldb, scalar_t* y, int ldy) {
  const char no = 'N';
  const scalar_t one = 1, zero = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&no, &no, &Nc, &M, &K, &one, b, &ldb, x, &ldx, &zero, y, &ldy);
  } else {
    dgemm_(&no, &no, &Nc, &M, &K, &one, b, &ldb, x, &ldx, &zero, y, &ldy);
  }
}

// dst[w, kx, c] = act(src[w * src_step + kx * C + c] + bias[c]) for the W * KW pixels of one output row.
template <bool kRelu, typename scalar_t>
FASTCNN_VECTOR_CLONES void store_gemm_row(const scalar_t* __restrict__ src, int64_t src_step, int64_t W, int64_t KW,
                                          int64_t C, const scalar_t* __restrict__ b, scalar_t* __restrict__ dst) {
  for (int64_t w = 0; w < W; ++w, src += src_step) {
    for (int64_t kx = 0; kx < KW; ++kx, dst += C) {
      for (int64_t c = 0; c < C; ++c) dst[c] = store_value<kRelu, scalar_t>(src[kx * C + c], b[c]);
    }
  }
}

bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > std::numeric_limits<int>::max()) return false;
  }
  return true;
}

}  // namespace

at::Tensor gemm_forward_channels_last_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                          at::IntArrayRef padding, at::IntArrayRef output_padding, bool relu) {
  const int64_t N = input.size(0), C_in = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t C_out = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  const int64_t cols = KH * KW * C_out;                           // G's row: [ky, kx, c]
  const int64_t block = rows_per_block(N * H, W);  // input rows (n, h) per GEMM
  const at::ScalarType dtype = input.scalar_type();
  const bool blas = dtype == at::kFloat ? sgemm_ != nullptr : (dtype == at::kDouble && dgemm_ != nullptr);
  if (!blas || !input.is_cpu() || memory_format_of(input) != at::MemoryFormat::ChannelsLast ||
      !input.is_contiguous(at::MemoryFormat::ChannelsLast) || padding[0] != 0 || padding[1] != 0 ||
      output_padding[0] != 0 || output_padding[1] != 0 || weight.scalar_type() != dtype ||
      !fits_int({block * W, C_in, cols})) {
    return at::Tensor();
  }
  at::Tensor out = at::empty({N, C_out, H * KH, W * KW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // [C_in, KH, KW, C_out]
  const at::Tensor b = bias.defined() ? bias.to(dtype).contiguous() : at::zeros({C_out}, input.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gemm_forward_channels_last_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t rows = N * H, row = W * KW * C_out;  // input rows; one output row's elements
    at::parallel_for(0, (rows + block - 1) / block, 1, [&](int64_t lo, int64_t hi) {
      std::unique_ptr<scalar_t[]> g(new scalar_t[block * W * cols]);
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t r0 = k * block, r1 = std::min(rows, r0 + block);  // input rows r = n * H + h
        gemm_rows<scalar_t>(int((r1 - r0) * W), int(cols), int(C_in), x + r0 * W * C_in, int(C_in), wp, int(cols),
                            g.get(), int(cols));
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t ky = 0; ky < KH; ++ky) {  // output row (n, h * KH + ky) is row r * KH + ky of [N * OH]
            const scalar_t* src = g.get() + (r - r0) * W * cols + ky * KW * C_out;
            scalar_t* dst = o + (r * KH + ky) * row;
            relu ? store_gemm_row<true>(src, cols, W, KW, C_out, bp, dst)
                 : store_gemm_row<false>(src, cols, W, KW, C_out, bp, dst);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace fastcnn
