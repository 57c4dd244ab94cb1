// CPU kernel of the transposed convolution's stride-phase store (the math is in fastcnn/conv_transpose.h): one pass
// in the output's memory order that reads each phase result once, adds the bias, applies the activation and writes
// every output element once. Rows are the contiguous runs of the output: NHWC the C_out channels of one pixel (one
// phase per pixel, and unit stride in the phase tensor when it is channel-last, so the loop vectorises), NCHW the OW
// pixels of one (n, c, oy) row. No atomics; deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "fastcnn/checks.h"
#include "fastcnn/conv_transpose.h"

namespace fastcnn {
namespace {

template <typename scalar_t>
void phase_store_kernel(const PhaseTable<scalar_t>& table, const at::Tensor& bias, const at::Tensor& out,
                        bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), OH = out.size(2), OW = out.size(3);
  const auto os = out.strides();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const at::Tensor b_t = bias.defined() ? bias.to(at::toOpMathType(out.scalar_type())).contiguous()
                                        : at::zeros({C}, out.options().dtype(at::toOpMathType(out.scalar_type())));
  const acc_t* b = b_t.const_data_ptr<acc_t>();
  if (memory_format_of(out) == at::MemoryFormat::ChannelsLast) {
    at::parallel_for(0, N * OH * OW, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t lo,
                                                                                                  int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t ox = r % OW, oy = (r / OW) % OH, n = r / (OW * OH);
        const int64_t ay = oy + table.pad_h, ax = ox + table.pad_w;
        const int64_t phase = (ay % table.stride_h) * table.stride_w + ax % table.stride_w;
        const int64_t t = ay / table.stride_h, u = ax / table.stride_w;
        const scalar_t* p = table.data[phase];
        scalar_t* __restrict__ dst = o + n * os[0] + oy * os[2] + ox * os[3];
        if (p != nullptr && t < table.len_h[phase] && u < table.len_w[phase]) {
          const int64_t* s = table.strides[phase];
          const scalar_t* __restrict__ src = p + n * s[0] + t * s[2] + u * s[3];
          const int64_t cs = s[1];
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
      scalar_t* __restrict__ dst = o + n * os[0] + c * os[1] + oy * os[2];
      for (int64_t ox = 0; ox < OW; ++ox) {
        dst[ox] = bias_act<scalar_t>(phase_value<scalar_t, acc_t>(table, n, c, oy, ox), b[c], relu);
      }
    }
  });
}

}  // namespace

void phase_store_bias_act_cpu(const std::vector<at::Tensor>& phases, const at::Tensor& bias, const at::Tensor& out,
                              std::array<int64_t, 2> stride, std::array<int64_t, 2> padding, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "phase_store_bias_act_cpu", [&] {
    phase_store_kernel<scalar_t>(make_phase_table<scalar_t>(phases, stride, padding), bias, out, relu);
  });
}

}  // namespace fastcnn
