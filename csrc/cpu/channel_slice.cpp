// CPU kernel of scale_shift_relu_out: out[n, c, h, w] = relu(input[n, c, h, w] * scale[c] + shift[c]), stored into
// a given 4-D tensor of any strides - a channel slice of a larger concatenated tensor, so that the branches of an
// Inception block write their outputs in place and no concatenation copy is made (math:
// fastcnn/reference/channel_slice.py).
//
// The walk follows out's layout, so that the inner loop is unit-stride in both tensors wherever out allows it:
//   channels innermost (out.stride(1) == 1: a channel slice of an NHWC tensor): a row is one pixel (n, h, w), its
//     C channels are the inner loop, and input is read channels_last;
//   width innermost (anything else; a channel slice of an NCHW tensor is, per image, a contiguous block of C planes):
//     a row is (n, c, h) - or a whole (n, c) plane when out's rows of a plane are back to back - and input is read
//     contiguous (NCHW).
// Each row has a unit-stride loop (vectorised by the compiler) and a strided one for other out strides. The value is
// computed in at::opmath_type (float for bf16/fp16) and rounded once; NaN propagates as torch.relu's does.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastcnn/channel_slice.h"
#include "fastcnn/cpu_loops.h"

#include <vector>

namespace fastcnn {
namespace {

template <typename acc_t>
inline acc_t relu_affine(acc_t x, acc_t scale, acc_t shift) {
  const acc_t v = x * scale + shift;
  return keep_if(v, !(v <= acc_t(0)));  // a bit select: vectorises where `?:` may become a branch
}

// One row of `len` elements: input unit-stride from x, out `stride` apart from o. kPerElement: element i has its own
// channel i (channels innermost); otherwise the whole row has channel `ch`.
template <bool kPerElement, bool kUnitStride, typename scalar_t, typename acc_t>
inline void store_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ o, int64_t len, int64_t stride,
                      const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, int64_t ch) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t c = kPerElement ? i : ch;
    o[kUnitStride ? i : i * stride] = static_cast<scalar_t>(relu_affine(static_cast<acc_t>(x[i]), scale[c], shift[c]));
  }
}

// The geometry of one walk: rows, their length, and where row r starts in input (r * len) and in out.
struct Walk {
  bool channels_inner;
  int64_t rows, len, inner_stride;
  int64_t C, H, W, s0, s1, s2, s3;  // out's sizes and strides
  bool plane_rows;                  // width innermost, one row = a whole (n, c) plane

  int64_t out_offset(int64_t r) const {
    if (channels_inner) {  // r = (n * H + h) * W + w
      return (r / (H * W)) * s0 + ((r / W) % H) * s2 + (r % W) * s3;
    }
    if (plane_rows) return (r / C) * s0 + (r % C) * s1;  // r = n * C + c
    return (r / (C * H)) * s0 + ((r / H) % C) * s1 + (r % H) * s2;  // r = (n * C + c) * H + h
  }
  int64_t channel_of(int64_t r) const { return plane_rows ? r % C : (r / H) % C; }
};

Walk walk_of(const at::Tensor& out) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  Walk w{channels_innermost(out), 0, 0, 0, C, H, W, out.stride(0), out.stride(1), out.stride(2), out.stride(3), false};
  if (w.channels_inner) {
    w.rows = N * H * W, w.len = C, w.inner_stride = w.s1;
  } else {
    w.plane_rows = H == 1 || w.s2 == W * w.s3;
    w.rows = w.plane_rows ? N * C : N * C * H;
    w.len = w.plane_rows ? H * W : W;
    w.inner_stride = w.s3;
  }
  return w;
}

template <bool kPerElement, bool kUnitStride, typename scalar_t, typename acc_t>
void store_rows(const Walk& w, const scalar_t* xp, scalar_t* op, const acc_t* sc, const acc_t* sh) {
  at::parallel_for(0, w.rows, grain_for(w.len), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      store_row<kPerElement, kUnitStride>(xp + r * w.len, op + w.out_offset(r), w.len, w.inner_stride, sc, sh,
                                          kPerElement ? 0 : w.channel_of(r));
    }
  });
}

template <typename scalar_t>
void store_kernel(const at::Tensor& x, const std::vector<at::opmath_type<scalar_t>>& sc,
                  const std::vector<at::opmath_type<scalar_t>>& sh, const Walk& w, at::Tensor& out) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const bool unit = w.inner_stride == 1;
  if (w.channels_inner) {
    unit ? store_rows<true, true>(w, xp, op, sc.data(), sh.data())
         : store_rows<true, false>(w, xp, op, sc.data(), sh.data());
  } else {
    unit ? store_rows<false, true>(w, xp, op, sc.data(), sh.data())
         : store_rows<false, false>(w, xp, op, sc.data(), sh.data());
  }
}

template <typename acc_t>
std::vector<acc_t> per_channel_values(const c10::optional<at::Tensor>& t, int64_t C, acc_t fallback) {
  std::vector<acc_t> v(C, fallback);
  if (t.has_value()) std::copy_n(t->const_data_ptr<acc_t>(), C, v.begin());
  return v;
}

void scale_shift_relu_out_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& scale,
                              const at::Tensor& shift, at::Tensor out) {
  check_store_into(input, out);
  const auto sc = optional_per_channel(scale, input, "scale");
  const auto sh = optional_per_channel(shift, input, "shift");
  if (out.numel() == 0) return;
  const Walk w = walk_of(out);
  const at::Tensor x = input.contiguous(w.channels_inner ? at::MemoryFormat::ChannelsLast
                                                         : at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_shift_relu_out_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    store_kernel<scalar_t>(x, per_channel_values<acc_t>(sc, w.C, 1), per_channel_values<acc_t>(sh, w.C, 0), w, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("scale_shift_relu_out", &scale_shift_relu_out_cpu);
}

}  // namespace fastcnn
