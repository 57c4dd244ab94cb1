// CPU kernel of the fused epilogue's forward: optional per-channel scale, bias, ReLU and pool in one pass over the
// convolution output (the backward is in conv_relu_pool_backward.cpp).
//
// Value per element: conv * scale[c] + bias[c] (scale 1, bias 0 when absent), computed in at::opmath_type and
// rounded to the tensor dtype once, as eager's separate `add_` (or BatchNorm's affine map) does, so the pool selects
// the same element as Conv2d -> ReLU -> MaxPool2d (or Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d) in every dtype.
// Without a scale, x * 1 + b rounds exactly as x + b. Sums accumulate in at::opmath_type (fp32 for bf16/fp16). Every
// output element is written by exactly one thread: no atomics, deterministic results.
//
// Work is cut into rows of K elements that are contiguous in the pooled tensors, the same for both layouts:
// NCHW: the PW pooled pixels of one (n, c, ph); NHWC: the C channels of one (n, ph, pw). Along a row the conv
// element of window offset (i, j) moves by `step` (NCHW: the pool's column stride, a compile-time 2 for the common
// 2x2 pool; NHWC: 1). pool="none" is elementwise: NCHW rows are whole (n, c) planes, NHWC rows one pixel's channels.
// The row loops take every pointer __restrict__ (the uint8 code store could otherwise alias them and force reloads
// element by element) and fold branch-free, so they vectorise; they are compiled for AVX2 too (fastcnn/cpu_loops.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastcnn/bias_relu_pool.h"
#include "fastcnn/checks.h"
#include "fastcnn/cpu_loops.h"

#include <cstring>
#include <vector>

namespace fastcnn {
namespace {

// Where the rows of a conv/pooled tensor pair are, for one layout.
struct RowLayout {
  bool channels_last;
  int64_t N, C, H, W, PH, PW;  // conv size H x W, pooled size PH x PW
  PoolWindow win;

  int64_t rows() const { return channels_last ? N * PH * PW : N * C * PH; }
  int64_t row_length() const { return channels_last ? C : PW; }
  int64_t window_row() const { return channels_last ? W * C : W; }  // conv offset of one window row down
  int64_t window_col() const { return channels_last ? C : 1; }      // and of one window column right
  int64_t pooled_offset(int64_t r) const { return r * row_length(); }
  // Conv offset of window (0, 0) of the row's first element.
  int64_t conv_offset(int64_t r) const {
    if (channels_last) {
      const int64_t pw = r % PW, ph = (r / PW) % PH, n = r / (PW * PH);
      return ((n * H + ph * win.sh) * W + pw * win.sw) * C;
    }
    const int64_t ph = r % PH, plane = r / PH;
    return (plane * H + ph * win.sh) * W;
  }
  int64_t channel(int64_t r) const { return (r / PH) % C; }  // of an NCHW row
};

RowLayout make_rows(at::MemoryFormat fmt, at::IntArrayRef conv_sizes, int64_t PH, int64_t PW, PoolMode mode,
                    const PoolWindow& win) {
  const PoolWindow w = mode == PoolMode::None ? PoolWindow{1, 1, 1, 1} : win;
  return {fmt == at::MemoryFormat::ChannelsLast, conv_sizes[0], conv_sizes[1], conv_sizes[2], conv_sizes[3],
          PH, PW, w};
}

// relu(round(x * scale + bias)) in acc_t: +0 where the rounded value is <= 0, NaN kept (torch.relu's rule).
template <typename scalar_t, typename acc_t>
inline acc_t activate(scalar_t x, acc_t scale, acc_t bias) {
  const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x) * scale + bias));
  return keep_if(v, !(v <= acc_t(0)));
}

// pool="none": K elements, scale and bias of element k at index k * kStep (1: per channel, 0: one per row).
template <int kStep, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void relu_run(const scalar_t* __restrict__ conv, const acc_t* __restrict__ scale,
                                    const acc_t* __restrict__ bias, int64_t K, scalar_t* __restrict__ out) {
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<scalar_t>(activate(conv[k], scale[k * kStep], bias[k * kStep]));
}

// One pooled row: relu(conv * scale + bias) rounded to scalar_t, folded over the window in row-major order into a
// running max (PyTorch's rule: replace when v > best or v is NaN, starting below every ReLU output) or a running sum
// and bit field. Conv element k of window offset (i, j) is at i * win_row + j * win_col + k * step (kStep > 0:
// step = kStep); its scale and bias at index k * kScaleStep (1: NHWC, per channel; 0: NCHW, the row's channel).
// The selection is kept in `sel` as words as wide as acc_t and made with bit masks, so that the compiler neither
// branches (random data mispredicts half the time) nor mixes lane widths; the code is narrowed to uint8 at the end.
template <PoolMode kMode, int kStep, int kScaleStep, typename scalar_t, typename acc_t>
FASTCNN_VECTOR_CLONES void pool_run(const scalar_t* __restrict__ conv, int64_t step, int64_t win_row,
                                    int64_t win_col, PoolWindow win, const acc_t* __restrict__ scale,
                                    const acc_t* __restrict__ bias, int64_t K, acc_t* __restrict__ acc,
                                    bits_of_size<sizeof(acc_t)>* __restrict__ sel, scalar_t* __restrict__ out,
                                    uint8_t* __restrict__ code) {
  using bits_t = bits_of_size<sizeof(acc_t)>;
  const int64_t st = kStep > 0 ? kStep : step;
  for (int64_t k = 0; k < K; ++k) {
    acc[k] = kMode == PoolMode::Avg ? acc_t(0) : acc_t(-1);
    sel[k] = 0;
  }
  for (int64_t i = 0; i < win.kh; ++i) {
    for (int64_t j = 0; j < win.kw; ++j) {
      const scalar_t* __restrict__ src = conv + i * win_row + j * win_col;
      const auto offset = static_cast<bits_t>(i * win.kw + j);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = activate(src[k * st], scale[k * kScaleStep], bias[k * kScaleStep]);
        if constexpr (kMode == PoolMode::Avg) {
          acc[k] += v;
          sel[k] |= static_cast<bits_t>(relu_passes(v)) << offset;
        } else {
          const bits_t take = -static_cast<bits_t>((v > acc[k]) | (v != v));
          acc[k] = blend(take, v, acc[k]);
          sel[k] = (offset & take) | (sel[k] & ~take);
        }
      }
    }
  }
  const acc_t area = static_cast<acc_t>(win.area());
  for (int64_t k = 0; k < K; ++k) {
    out[k] = static_cast<scalar_t>(kMode == PoolMode::Avg ? acc[k] / area : acc[k]);
    code[k] = static_cast<uint8_t>(sel[k]);
  }
}

// `vector` (C,) in acc_t, or C copies of `fill` when absent.
template <typename acc_t>
at::Tensor channel_vector(const c10::optional<at::Tensor>& vector, const at::Tensor& conv, double fill) {
  const auto options = conv.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (!vector.has_value() || !vector->defined()) return at::full({conv.size(1)}, fill, options);
  return vector->to(options.dtype()).contiguous();
}

template <PoolMode kMode, typename scalar_t, typename acc_t>
void pool_kernel(const scalar_t* src, const acc_t* scales, const acc_t* biases, const RowLayout& L, scalar_t* dst,
                 uint8_t* codes) {
  const int64_t K = L.row_length();
  at::parallel_for(0, L.rows(), grain_for(K * L.win.area()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(K);
    std::vector<bits_of_size<sizeof(acc_t)>> sel(K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = L.pooled_offset(r);
      const scalar_t* conv = src + L.conv_offset(r);
      if (L.channels_last) {
        pool_run<kMode, 1, 1>(conv, 1, L.window_row(), L.window_col(), L.win, scales, biases, K, acc.data(),
                              sel.data(), dst + p, codes + p);
      } else if (L.win.sw == 2) {
        const int64_t c = L.channel(r);
        pool_run<kMode, 2, 0>(conv, 2, L.window_row(), L.window_col(), L.win, scales + c, biases + c, K, acc.data(),
                              sel.data(), dst + p, codes + p);
      } else {
        const int64_t c = L.channel(r);
        pool_run<kMode, 0, 0>(conv, L.win.sw, L.window_row(), L.window_col(), L.win, scales + c, biases + c, K,
                              acc.data(), sel.data(), dst + p, codes + p);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void relu_kernel(const scalar_t* src, const acc_t* scales, const acc_t* biases, const RowLayout& L, scalar_t* dst) {
  // NHWC: one pixel's C channels per row; NCHW: one (n, c) plane per row.
  const int64_t K = L.channels_last ? L.C : L.H * L.W, rows = L.N * L.H * L.W * L.C / std::max<int64_t>(K, 1);
  at::parallel_for(0, rows, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (L.channels_last) {
        relu_run<1>(src + r * K, scales, biases, K, dst + r * K);
      } else {
        relu_run<0>(src + r * K, scales + r % L.C, biases + r % L.C, K, dst + r * K);
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& conv, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& bias, PoolMode mode, const RowLayout& L, at::Tensor& out,
                    at::Tensor& code) {
  using acc_t = at::opmath_type<scalar_t>;
  if (out.numel() == 0) return;
  const scalar_t* src = conv.const_data_ptr<scalar_t>();
  // Absent scale and bias are exact ones and zeros: x * 1 + 0 rounds back to x, so one formula serves every case.
  const at::Tensor s = channel_vector<acc_t>(scale, conv, 1.0), b = channel_vector<acc_t>(bias, conv, 0.0);
  const acc_t* scales = s.const_data_ptr<acc_t>();
  const acc_t* biases = b.const_data_ptr<acc_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  if (mode == PoolMode::None) {
    relu_kernel<scalar_t, acc_t>(src, scales, biases, L, dst);
  } else if (mode == PoolMode::Max) {
    pool_kernel<PoolMode::Max, scalar_t, acc_t>(src, scales, biases, L, dst, code.mutable_data_ptr<uint8_t>());
  } else {
    pool_kernel<PoolMode::Avg, scalar_t, acc_t>(src, scales, biases, L, dst, code.mutable_data_ptr<uint8_t>());
  }
}

std::tuple<at::Tensor, at::Tensor> bias_relu_pool_cpu(const at::Tensor& conv_in, const c10::optional<at::Tensor>& bias,
                                                      c10::string_view pool, at::IntArrayRef pool_size,
                                                      at::IntArrayRef pool_stride,
                                                      const c10::optional<at::Tensor>& scale) {
  EpilogueForward f = prepare_epilogue_forward(conv_in, bias, pool, pool_size, pool_stride, scale);
  const RowLayout L = make_rows(f.fmt, f.conv.sizes(), f.out.size(2), f.out.size(3), f.mode, f.win);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.conv.scalar_type(), "bias_relu_pool_cpu", [&] {
    forward_kernel<scalar_t>(f.conv, scale, bias, f.mode, L, f.out, f.code);
  });
  return {f.out, f.code};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bias_relu_pool", &bias_relu_pool_cpu);
}

}  // namespace fastcnn
