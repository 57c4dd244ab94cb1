// CPU kernels of the fused epilogue: bias + ReLU + pool in one pass over the convolution output (forward), and the
// gradient of the convolution output gathered from the pooled gradient and the compact code (backward).
//
// Values are rounded to the tensor dtype after the bias add, as eager's separate `add_` does, so the pool selects
// the same element as Conv2d -> ReLU -> MaxPool2d in every dtype. Sums accumulate in at::opmath_type (fp32 for
// bf16/fp16). Every output element is written by exactly one thread: no atomics, deterministic results.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/llvmMathExtras.h>
#include <torch/library.h>

#include "fastcnn/checks.h"

namespace fastcnn {
namespace {

// Element offset of (n, c, h, w) in a 4-D tensor from its strides.
struct Strided4d {
  int64_t n, c, h, w;
  explicit Strided4d(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const { return in * n + ic * c + ih * h + iw * w; }
};

// Calls f(n, c, y, x) for every element of an N x C x H x W grid, rows (n, y) split across threads, walking memory
// contiguously: channel innermost for NHWC, width innermost for NCHW.
template <typename F>
void for_each_element(int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * W));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, y = row % H;
      if (channels_last) {
        for (int64_t x = 0; x < W; ++x)
          for (int64_t c = 0; c < C; ++c) f(n, c, y, x);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t x = 0; x < W; ++x) f(n, c, y, x);
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& conv, const c10::optional<at::Tensor>& bias, PoolMode mode,
                    const PoolWindow& win, at::Tensor& out, at::Tensor& code) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* src = conv.const_data_ptr<scalar_t>();
  const scalar_t* b = bias.has_value() && bias->defined() ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  uint8_t* codes = mode == PoolMode::None ? nullptr : code.mutable_data_ptr<uint8_t>();
  const Strided4d in(conv), o(out);
  // relu(conv + bias), rounded to scalar_t after the add.
  const auto activate = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    acc_t v = static_cast<acc_t>(src[in.at(n, c, h, w)]);
    if (b != nullptr) v = static_cast<acc_t>(static_cast<scalar_t>(v + static_cast<acc_t>(b[c])));
    return v <= acc_t(0) ? acc_t(0) : v;
  };
  for_each_element(out.size(0), out.size(1), out.size(2), out.size(3), memory_format_of(out) ==
                   at::MemoryFormat::ChannelsLast, [&](int64_t n, int64_t c, int64_t ph, int64_t pw) {
    const int64_t dst_at = o.at(n, c, ph, pw);
    if (mode == PoolMode::None) {
      dst[dst_at] = static_cast<scalar_t>(activate(n, c, ph, pw));
      return;
    }
    const int64_t h0 = ph * win.sh, w0 = pw * win.sw;
    acc_t best = activate(n, c, h0, w0), sum = 0;
    uint8_t selected = 0, bits = 0;
    for (int64_t i = 0; i < win.kh; ++i) {
      for (int64_t j = 0; j < win.kw; ++j) {
        const acc_t v = activate(n, c, h0 + i, w0 + j);
        const auto offset = static_cast<uint8_t>(i * win.kw + j);
        if (mode == PoolMode::Max) {
          max_update(v, offset, best, selected);
        } else {
          sum += v;
          bits |= static_cast<uint8_t>(relu_passes(v)) << offset;
        }
      }
    }
    dst[dst_at] = static_cast<scalar_t>(mode == PoolMode::Max ? best : sum / static_cast<acc_t>(win.area()));
    codes[dst_at] = mode == PoolMode::Max ? selected : bits;
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                     const PoolWindow& win, at::Tensor& grad_conv) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  const uint8_t* codes = mode == PoolMode::None ? nullptr : code.const_data_ptr<uint8_t>();
  scalar_t* dst = grad_conv.mutable_data_ptr<scalar_t>();
  const Strided4d p(grad_out), d(grad_conv);
  const int64_t PH = grad_out.size(2), PW = grad_out.size(3);
  for_each_element(grad_conv.size(0), grad_conv.size(1), grad_conv.size(2), grad_conv.size(3),
                   memory_format_of(grad_conv) == at::MemoryFormat::ChannelsLast,
                   [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    if (mode == PoolMode::None) {
      const int64_t at = p.at(n, c, h, w);
      dst[d.at(n, c, h, w)] = relu_passes(static_cast<acc_t>(y[at])) ? g[at] : scalar_t(0);
      return;
    }
    // dL/dconv[h, w] sums the pooled gradients of every window containing (h, w) that routes to it.
    int64_t ph0, ph1, pw0, pw1;
    windows_containing(h, win.kh, win.sh, PH, ph0, ph1);
    windows_containing(w, win.kw, win.sw, PW, pw0, pw1);
    acc_t sum = 0;
    for (int64_t ph = ph0; ph <= ph1; ++ph) {
      for (int64_t pw = pw0; pw <= pw1; ++pw) {
        const int64_t at = p.at(n, c, ph, pw);
        const int64_t offset = (h - ph * win.sh) * win.kw + (w - pw * win.sw);
        const bool routes = mode == PoolMode::Max
                                ? codes[at] == offset && relu_passes(static_cast<acc_t>(y[at]))
                                : ((codes[at] >> offset) & 1) != 0;
        if (routes) sum += static_cast<acc_t>(g[at]);
      }
    }
    if (mode == PoolMode::Avg) sum /= static_cast<acc_t>(win.area());
    dst[d.at(n, c, h, w)] = static_cast<scalar_t>(sum);
  });
}

// dL/dbias[c] = sum of dL/dconv over (n, h, w), taken from the pooled tensors: a max window routes its whole
// gradient to one element (when the ReLU passes), an avg window routes grad / area to each set bit of its code.
template <typename scalar_t>
void bias_grad_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& code, PoolMode mode,
                      const PoolWindow& win, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  const uint8_t* codes = mode == PoolMode::Avg ? code.const_data_ptr<uint8_t>() : nullptr;
  scalar_t* dst = grad_bias.mutable_data_ptr<scalar_t>();
  const Strided4d p(grad_out);
  const int64_t N = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t sum = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const int64_t at = p.at(n, c, h, w);
            if (mode == PoolMode::Avg) {
              sum += static_cast<acc_t>(g[at]) * static_cast<acc_t>(c10::llvm::countPopulation(codes[at]));
            } else if (relu_passes(static_cast<acc_t>(y[at]))) {
              sum += static_cast<acc_t>(g[at]);
            }
          }
      dst[c] = static_cast<scalar_t>(mode == PoolMode::Avg ? sum / static_cast<acc_t>(win.area()) : sum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bias_relu_pool_cpu(const at::Tensor& conv_in, const c10::optional<at::Tensor>& bias,
                                                      c10::string_view pool, at::IntArrayRef pool_size,
                                                      at::IntArrayRef pool_stride) {
  const PoolMode mode = parse_pool(pool);
  const PoolWindow win{pool_size[0], pool_size[1], pool_stride[0], pool_stride[1]};
  check_floating_4d(conv_in, "conv");
  check_bias(bias, conv_in);
  check_pool_window(mode, win);
  const at::MemoryFormat fmt = memory_format_of(conv_in);
  const at::Tensor conv = conv_in.contiguous(fmt);
  const auto [ph, pw] = pooled_size(conv.size(2), conv.size(3), mode, win);
  at::Tensor out = at::empty({conv.size(0), conv.size(1), ph, pw}, conv.options().memory_format(fmt));
  at::Tensor code = mode == PoolMode::None ? at::empty({0}, conv.options().dtype(at::kByte))
                                           : at::empty_like(out, out.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, conv.scalar_type(), "bias_relu_pool_cpu", [&] {
    forward_kernel<scalar_t>(conv, bias, mode, win, out, code);
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
  at::Tensor grad_conv = at::empty({out.size(0), out.size(1), H, W}, out.options().memory_format(fmt));
  at::Tensor grad_bias = at::empty({bias_grad ? out.size(1) : 0}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "bias_relu_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, out, code, mode, win, grad_conv);
    if (bias_grad) bias_grad_kernel<scalar_t>(grad_out, out, code, mode, win, grad_bias);
  });
  return {grad_conv, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bias_relu_pool", &bias_relu_pool_cpu);
  m.impl("bias_relu_pool_backward", &bias_relu_pool_backward_cpu);
}

}  // namespace fastcnn
