// CPU kernel of the k == s transposed convolution's pixel-shuffle epilogue (the math is in
// fastcnn/conv_transpose.h): one pass that reads the GEMM result once, adds the bias, applies the activation and
// writes every output element once. Rows are the contiguous runs of the output: NHWC the C_out channels of one
// pixel (unit stride in both tensors when the GEMM was laid out channel-last, so the loop vectorises), NCHW the OW
// pixels of one (n, c, oy) row. No atomics; deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"

namespace fastcnn {
namespace {

// act(x + b) rounded to scalar_t after the add; the ReLU keeps NaN (only v <= 0 becomes 0).
template <typename scalar_t, typename acc_t>
inline scalar_t bias_act(acc_t x, acc_t b, bool relu) {
  const scalar_t v = static_cast<scalar_t>(x + b);
  return relu && static_cast<acc_t>(v) <= acc_t(0) ? scalar_t(0) : v;
}

template <typename scalar_t>
void shuffle_kernel(const at::Tensor& gemm, const at::Tensor& bias, const at::Tensor& out,
                    std::array<int64_t, 2> padding, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), OH = out.size(2), OW = out.size(3);
  const int64_t H = gemm.size(1), W = gemm.size(2), KH = gemm.size(4), KW = gemm.size(5);
  const auto gs = gemm.strides();
  const auto os = out.strides();
  const scalar_t* g = gemm.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const at::Tensor b_t = bias.defined() ? bias.to(at::toOpMathType(out.scalar_type())).contiguous()
                                        : at::zeros({C}, out.options().dtype(at::toOpMathType(out.scalar_type())));
  const acc_t* b = b_t.const_data_ptr<acc_t>();
  if (memory_format_of(out) == at::MemoryFormat::ChannelsLast) {
    at::parallel_for(0, N * OH * OW, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t lo,
                                                                                                  int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t ox = r % OW, oy = (r / OW) % OH, n = r / (OW * OH);
        const int64_t iy = (oy + padding[0]) / KH, ky = (oy + padding[0]) % KH;
        const int64_t ix = (ox + padding[1]) / KW, kx = (ox + padding[1]) % KW;
        scalar_t* __restrict__ dst = o + n * os[0] + oy * os[2] + ox * os[3];
        if (iy < H && ix < W) {
          const scalar_t* __restrict__ src = g + n * gs[0] + iy * gs[1] + ix * gs[2] + ky * gs[4] + kx * gs[5];
          const int64_t cs = gs[3];
          for (int64_t c = 0; c < C; ++c) dst[c] = bias_act<scalar_t>(static_cast<acc_t>(src[c * cs]), b[c], relu);
        } else {
          for (int64_t c = 0; c < C; ++c) dst[c] = bias_act<scalar_t>(acc_t(0), b[c], relu);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * C * OH, std::max<int64_t>(1, 16384 / std::max<int64_t>(OW, 1)), [&](int64_t lo,
                                                                                                int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t oy = r % OH, c = (r / OH) % C, n = r / (OH * C);
      const int64_t iy = (oy + padding[0]) / KH, ky = (oy + padding[0]) % KH;
      scalar_t* __restrict__ dst = o + n * os[0] + c * os[1] + oy * os[2];
      if (iy >= H) {
        for (int64_t ox = 0; ox < OW; ++ox) dst[ox] = bias_act<scalar_t>(acc_t(0), b[c], relu);
        continue;
      }
      const scalar_t* __restrict__ src = g + n * gs[0] + iy * gs[1] + c * gs[3] + ky * gs[4];
      for (int64_t ox = 0; ox < OW; ++ox) {
        const int64_t ix = (ox + padding[1]) / KW, kx = (ox + padding[1]) % KW;
        const acc_t v = ix < W ? static_cast<acc_t>(src[ix * gs[2] + kx * gs[5]]) : acc_t(0);
        dst[ox] = bias_act<scalar_t>(v, b[c], relu);
      }
    }
  });
}

}  // namespace

void shuffle_bias_act_cpu(const at::Tensor& gemm, const at::Tensor& bias, const at::Tensor& out,
                          std::array<int64_t, 2> padding, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "shuffle_bias_act_cpu", [&] {
    shuffle_kernel<scalar_t>(gemm, bias, out, padding, relu);
  });
}

}  // namespace fastcnn
