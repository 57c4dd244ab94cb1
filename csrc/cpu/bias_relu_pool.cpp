// CPU kernels of the fused epilogue: optional per-channel scale, bias, ReLU and pool in one pass over the convolution
// output (forward), and the gradient at the scaled-and-shifted value rebuilt from the pooled gradient and the compact
// code (backward).
//
// Forward value per element: conv * scale[c] + bias[c] (scale 1, bias 0 when absent), computed in at::opmath_type
// and rounded to the tensor dtype once, as eager's separate `add_` (or BatchNorm's affine map) does, so the pool
// selects the same element as Conv2d -> ReLU -> MaxPool2d (or Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d) in every
// dtype. Without a scale, x * 1 + b rounds exactly as x + b. Sums accumulate in at::opmath_type (fp32 for
// bf16/fp16). Every output element is written by exactly one thread: no atomics, deterministic results.
//
// Work is cut into rows of K elements that are contiguous in the pooled tensors, the same for both layouts:
// NCHW: the PW pooled pixels of one (n, c, ph); NHWC: the C channels of one (n, ph, pw). Along a row the conv
// element of window offset (i, j) moves by `step` (NCHW: the pool's column stride; NHWC: 1), so the inner loops
// are simple strided (NHWC: unit-stride, vectorisable) sweeps.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/llvmMathExtras.h>
#include <torch/library.h>

#include "fastcnn/checks.h"

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
  // Every conv element lies in exactly one window (no gaps, no overlaps, no floor-mode remainder).
  bool windows_tile_conv() const {
    return win.kh == win.sh && win.kw == win.sw && PH * win.sh == H && PW * win.sw == W;
  }
  bool windows_overlap() const { return win.kh > win.sh || win.kw > win.sw; }
};

RowLayout make_rows(at::MemoryFormat fmt, at::IntArrayRef conv_sizes, int64_t PH, int64_t PW, PoolMode mode,
                    const PoolWindow& win) {
  const PoolWindow w = mode == PoolMode::None ? PoolWindow{1, 1, 1, 1} : win;
  return {fmt == at::MemoryFormat::ChannelsLast, conv_sizes[0], conv_sizes[1], conv_sizes[2], conv_sizes[3],
          PH, PW, w};
}

// Splits the rows across threads, handing each chunk scratch buffers of one row.
template <typename acc_t, typename F>
void for_each_row(const RowLayout& L, const F& f) {
  const int64_t work_per_row = std::max<int64_t>(1, L.row_length() * L.win.area());
  at::parallel_for(0, L.rows(), std::max<int64_t>(1, 32768 / work_per_row), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(L.row_length());
    std::vector<uint8_t> sel(L.row_length());
    for (int64_t r = begin; r < end; ++r) f(r, acc.data(), sel.data());
  });
}

// One row of the forward: relu(conv * scale + bias) rounded to scalar_t, folded over the window in row-major order
// into a running max (PyTorch's rule, starting below every ReLU output) or a running sum and bit field. NHWC rows
// (kChannelsLast) are unit-stride with a scale and bias per element, so the compiler vectorises them (the
// __restrict__s say that the uint8 code, which may alias anything, does not); NCHW rows move by the pool's column
// stride and share one channel's scale and bias.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
void forward_row(const scalar_t* __restrict__ conv, const acc_t* __restrict__ scale, const acc_t* __restrict__ bias,
                 const RowLayout& L, PoolMode mode, acc_t* __restrict__ acc, uint8_t* __restrict__ sel,
                 scalar_t* __restrict__ out, uint8_t* __restrict__ code) {
  const int64_t K = L.row_length(), step = kChannelsLast ? 1 : L.win.sw;
  const bool is_avg = mode == PoolMode::Avg;
  const auto activate = [&](int64_t k, const scalar_t* src) {
    const int64_t c = kChannelsLast ? k : 0;
    const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(src[k * step]) * scale[c] + bias[c]));
    return v <= acc_t(0) ? acc_t(0) : v;
  };
  for (int64_t k = 0; k < K; ++k) {
    acc[k] = is_avg ? acc_t(0) : acc_t(-1);
    sel[k] = 0;
  }
  for (int64_t i = 0; i < L.win.kh; ++i) {
    for (int64_t j = 0; j < L.win.kw; ++j) {
      const scalar_t* __restrict__ src = conv + i * L.window_row() + j * L.window_col();
      const auto offset = static_cast<uint8_t>(i * L.win.kw + j);
      if (is_avg) {
        for (int64_t k = 0; k < K; ++k) {
          const acc_t v = activate(k, src);
          acc[k] += v;
          sel[k] |= static_cast<uint8_t>(relu_passes(v)) << offset;
        }
      } else {
        for (int64_t k = 0; k < K; ++k) max_update(activate(k, src), offset, acc[k], sel[k]);
      }
    }
  }
  const acc_t area = static_cast<acc_t>(L.win.area());
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<scalar_t>(is_avg ? acc[k] / area : acc[k]);
  if (code != nullptr) std::copy(sel, sel + K, code);
}

// `vector` (C,) in acc_t, or C copies of `fill` when absent.
template <typename acc_t>
at::Tensor channel_vector(const c10::optional<at::Tensor>& vector, const at::Tensor& conv, double fill) {
  const auto options = conv.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (!vector.has_value() || !vector->defined()) return at::full({conv.size(1)}, fill, options);
  return vector->to(options.dtype()).contiguous();
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& conv, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& bias, PoolMode mode, const RowLayout& L, at::Tensor& out,
                    at::Tensor& code) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* src = conv.const_data_ptr<scalar_t>();
  // Absent scale and bias are exact ones and zeros: x * 1 + 0 rounds back to x, so one formula serves every case.
  const at::Tensor s = channel_vector<acc_t>(scale, conv, 1.0), b = channel_vector<acc_t>(bias, conv, 0.0);
  const acc_t* scales = s.const_data_ptr<acc_t>();
  const acc_t* biases = b.const_data_ptr<acc_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  uint8_t* codes = mode == PoolMode::None ? nullptr : code.mutable_data_ptr<uint8_t>();
  for_each_row<acc_t>(L, [&](int64_t r, acc_t* acc, uint8_t* sel) {
    const int64_t p = L.pooled_offset(r);
    uint8_t* row_code = codes == nullptr ? nullptr : codes + p;
    if (L.channels_last) {
      forward_row<true>(src + L.conv_offset(r), scales, biases, L, mode, acc, sel, dst + p, row_code);
    } else {
      const int64_t c = L.channel(r);
      forward_row<false>(src + L.conv_offset(r), scales + c, biases + c, L, mode, acc, sel, dst + p, row_code);
    }
  });
}

// Backward where each conv element lies in at most one window: every window writes its elements (the routed
// gradient or 0); elements in no window were zeroed beforehand. Rows as in forward_row.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
void backward_row(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y, const uint8_t* __restrict__ code,
                  const RowLayout& L, PoolMode mode, scalar_t* __restrict__ grad_conv) {
  const int64_t K = L.row_length(), step = kChannelsLast ? 1 : L.win.sw;
  const acc_t inv_area = acc_t(1) / static_cast<acc_t>(L.win.area());
  for (int64_t i = 0; i < L.win.kh; ++i) {
    for (int64_t j = 0; j < L.win.kw; ++j) {
      scalar_t* __restrict__ d = grad_conv + i * L.window_row() + j * L.window_col();
      const auto offset = static_cast<uint8_t>(i * L.win.kw + j);
      if (mode == PoolMode::Avg) {
        for (int64_t k = 0; k < K; ++k) {
          const bool routes = ((code[k] >> offset) & 1) != 0;
          d[k * step] = routes ? static_cast<scalar_t>(static_cast<acc_t>(g[k]) * inv_area) : scalar_t(0);
        }
      } else if (mode == PoolMode::Max) {
        for (int64_t k = 0; k < K; ++k) {
          const bool routes = code[k] == offset && relu_passes(static_cast<acc_t>(y[k]));
          d[k * step] = routes ? g[k] : scalar_t(0);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * step] = relu_passes(static_cast<acc_t>(y[k])) ? g[k] : scalar_t(0);
      }
    }
  }
}

template <typename scalar_t>
void backward_scatter_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                             const RowLayout& L, at::Tensor& grad_conv) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  const uint8_t* codes = mode == PoolMode::None ? nullptr : code.const_data_ptr<uint8_t>();
  scalar_t* dst = grad_conv.mutable_data_ptr<scalar_t>();
  for_each_row<acc_t>(L, [&](int64_t r, acc_t*, uint8_t*) {
    const int64_t p = L.pooled_offset(r);
    const uint8_t* row_code = codes == nullptr ? nullptr : codes + p;
    if (L.channels_last) {
      backward_row<true, scalar_t, acc_t>(g + p, y + p, row_code, L, mode, dst + L.conv_offset(r));
    } else {
      backward_row<false, scalar_t, acc_t>(g + p, y + p, row_code, L, mode, dst + L.conv_offset(r));
    }
  });
}

// Backward for overlapping windows: each conv element gathers, in a fixed order, the pooled gradients of every
// window containing it that routes to it.
template <typename scalar_t>
void backward_gather_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                            const RowLayout& L, at::Tensor& grad_conv) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  const uint8_t* codes = code.const_data_ptr<uint8_t>();
  scalar_t* dst = grad_conv.mutable_data_ptr<scalar_t>();
  const auto pooled_at = [&](int64_t n, int64_t c, int64_t ph, int64_t pw) {
    return L.channels_last ? ((n * L.PH + ph) * L.PW + pw) * L.C + c : ((n * L.C + c) * L.PH + ph) * L.PW + pw;
  };
  const auto conv_at = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return L.channels_last ? ((n * L.H + h) * L.W + w) * L.C + c : ((n * L.C + c) * L.H + h) * L.W + w;
  };
  at::parallel_for(0, L.N * L.C * L.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nch = begin; nch < end; ++nch) {
      const int64_t h = nch % L.H, c = (nch / L.H) % L.C, n = nch / (L.H * L.C);
      int64_t ph0, ph1;
      windows_containing(h, L.win.kh, L.win.sh, L.PH, ph0, ph1);
      for (int64_t w = 0; w < L.W; ++w) {
        int64_t pw0, pw1;
        windows_containing(w, L.win.kw, L.win.sw, L.PW, pw0, pw1);
        acc_t sum = 0;
        for (int64_t ph = ph0; ph <= ph1; ++ph) {
          for (int64_t pw = pw0; pw <= pw1; ++pw) {
            const int64_t at = pooled_at(n, c, ph, pw);
            const int64_t offset = (h - ph * L.win.sh) * L.win.kw + (w - pw * L.win.sw);
            const bool routes = mode == PoolMode::Max
                                    ? codes[at] == offset && relu_passes(static_cast<acc_t>(y[at]))
                                    : ((codes[at] >> offset) & 1) != 0;
            if (routes) sum += static_cast<acc_t>(g[at]);
          }
        }
        if (mode == PoolMode::Avg) sum /= static_cast<acc_t>(L.win.area());
        dst[conv_at(n, c, h, w)] = static_cast<scalar_t>(sum);
      }
    }
  });
}

// dL/dbias[c] = sum of dL/dconv over (n, h, w), taken from the pooled tensors: a max window routes its whole
// gradient to one element (when the ReLU passes), an avg window routes grad / area to each set bit of its code.
// Channels are split across threads; each sums its channels in a fixed order.
template <typename scalar_t>
void bias_grad_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                      const RowLayout& L, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  const uint8_t* codes = mode == PoolMode::Avg ? code.const_data_ptr<uint8_t>() : nullptr;
  scalar_t* dst = grad_bias.mutable_data_ptr<scalar_t>();
  const int64_t S = grad_out.size(2) * grad_out.size(3), C = L.C;
  const auto contribution = [&](int64_t at) {
    if (mode == PoolMode::Avg) {
      return static_cast<acc_t>(g[at]) * static_cast<acc_t>(c10::llvm::countPopulation(codes[at]));
    }
    return relu_passes(static_cast<acc_t>(y[at])) ? static_cast<acc_t>(g[at]) : acc_t(0);
  };
  const acc_t divisor = mode == PoolMode::Avg ? static_cast<acc_t>(L.win.area()) : acc_t(1);
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> sums(c1 - c0, acc_t(0));
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t c = c0; c < c1; ++c) {
          sums[c - c0] += contribution(L.channels_last ? (n * S + s) * C + c : (n * C + c) * S + s);
        }
      }
    }
    for (int64_t c = c0; c < c1; ++c) dst[c] = static_cast<scalar_t>(sums[c - c0] / divisor);
  });
}

std::tuple<at::Tensor, at::Tensor> bias_relu_pool_cpu(const at::Tensor& conv_in, const c10::optional<at::Tensor>& bias,
                                                      c10::string_view pool, at::IntArrayRef pool_size,
                                                      at::IntArrayRef pool_stride,
                                                      const c10::optional<at::Tensor>& scale) {
  const PoolMode mode = parse_pool(pool);
  const PoolWindow win{pool_size[0], pool_size[1], pool_stride[0], pool_stride[1]};
  check_floating_4d(conv_in, "conv");
  check_channel_vector(bias, conv_in, "bias");
  check_channel_vector(scale, conv_in, "scale");
  check_pool_window(mode, win);
  const at::MemoryFormat fmt = memory_format_of(conv_in);
  const at::Tensor conv = conv_in.contiguous(fmt);
  const auto [ph, pw] = pooled_size(conv.size(2), conv.size(3), mode, win);
  at::Tensor out = at::empty({conv.size(0), conv.size(1), ph, pw}, conv.options().memory_format(fmt));
  at::Tensor code = mode == PoolMode::None ? at::empty({0}, conv.options().dtype(at::kByte))
                                           : at::empty_like(out, out.options().dtype(at::kByte));
  const RowLayout L = make_rows(fmt, conv.sizes(), ph, pw, mode, win);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, conv.scalar_type(), "bias_relu_pool_cpu", [&] {
    forward_kernel<scalar_t>(conv, scale, bias, mode, L, out, code);
  });
  return {out, code};
}

std::tuple<at::Tensor, at::Tensor> bias_relu_pool_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& out_in,
                                                               const at::Tensor& code_in, c10::SymIntArrayRef conv_size,
                                                               c10::string_view pool, at::IntArrayRef pool_size,
                                                               at::IntArrayRef pool_stride, bool bias_grad) {
  const PoolMode mode = parse_pool(pool);
  const PoolWindow win{pool_size[0], pool_size[1], pool_stride[0], pool_stride[1]};
  check_pool_window(mode, win);
  check_pooled_triplet(grad_out_in, out_in, code_in, mode);
  const int64_t H = conv_size[0].expect_int(), W = conv_size[1].expect_int();
  const auto expected = pooled_size(H, W, mode, win);
  TORCH_CHECK(out_in.size(2) == expected[0] && out_in.size(3) == expected[1], "fastcnn: conv_size (", H, ", ", W,
              ") does not pool to out's spatial size ", out_in.sizes());
  // One layout for all three pooled tensors, so a single index serves them.
  const at::MemoryFormat fmt = memory_format_of(out_in);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt), out = out_in.contiguous(fmt);
  const at::Tensor code = mode == PoolMode::None ? code_in : code_in.contiguous(fmt);
  const auto options = out.options().memory_format(fmt);
  const std::vector<int64_t> sizes{out.size(0), out.size(1), H, W};
  const RowLayout L = make_rows(fmt, sizes, out.size(2), out.size(3), mode, win);
  // Elements in no window (gaps, the floor-mode remainder) must read 0; the kernels write all others.
  at::Tensor grad_conv = at::empty(sizes, options);
  if (!L.windows_tile_conv() && !L.windows_overlap()) grad_conv.zero_();
  at::Tensor grad_bias = at::empty({bias_grad ? out.size(1) : 0}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "bias_relu_pool_backward_cpu", [&] {
    if (L.windows_overlap()) {
      backward_gather_kernel<scalar_t>(grad_out, out, code, mode, L, grad_conv);
    } else {
      backward_scatter_kernel<scalar_t>(grad_out, out, code, mode, L, grad_conv);
    }
    if (bias_grad) bias_grad_kernel<scalar_t>(grad_out, out, code, mode, L, grad_bias);
  });
  return {grad_conv, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bias_relu_pool", &bias_relu_pool_cpu);
  m.impl("bias_relu_pool_backward", &bias_relu_pool_backward_cpu);
}

}  // namespace fastcnn
