// Layout and argument checks shared by the CPU and CUDA kernels of the fused BatchNorm pieces.
#pragma once

#include <ATen/ATen.h>

#include "fastcnn/checks.h"

#include <utility>


namespace fastcnn {

// A 4-D tensor seen as N x C x HW, stored NCHW (planes of HW) or NHWC (pixels of C).
struct BnLayout {
  bool channels_last;
  int64_t N, C, HW;
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

inline BnLayout bn_layout(const at::Tensor& x, const char* name) {
  check_floating_4d(x, name);
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0, "fastcnn: ", name,
              " must have at least one element per channel, got shape ", x.sizes());
  return {memory_format_of(x) == at::MemoryFormat::ChannelsLast, x.size(0), x.size(1), x.size(2) * x.size(3)};
}

// Statistics, scale and shift are in the accumulation dtype: float32, or float64 for float64 inputs.
inline at::ScalarType bn_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_per_channel(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "fastcnn: ", name, " must have shape (", x.size(1),
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == bn_acc_dtype(x) && t.device() == x.device(), "fastcnn: ", name, " must be ",
              bn_acc_dtype(x), " on ", x.device(), ", got ", t.scalar_type(), " on ", t.device());
}

inline c10::optional<at::Tensor> optional_per_channel(const c10::optional<at::Tensor>& t, const at::Tensor& x,
                                                      const char* name) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  check_per_channel(*t, x, name);
  return t->contiguous();
}

inline void check_same_as_input(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "fastcnn: ", name, " must match input's shape, dtype and device (", x.sizes(), ", ", x.scalar_type(),
              "), got ", t.sizes(), ", ", t.scalar_type());
}

// A tensor of x's shape, dtype and device, in x's layout.
inline c10::optional<at::Tensor> same_as_input(const c10::optional<at::Tensor>& t, const at::Tensor& x,
                                               const BnLayout& L, const char* name) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  check_same_as_input(*t, x, name);
  return t->contiguous(L.format());
}

// The distance between consecutive "rows" of a tensor in layout L, if t is laid out like a dense tensor of that
// layout except for that distance; else -1. A row is what stays contiguous in both layouts: NHWC one pixel's C
// channels, NCHW one sample's C * H * W values. A channel slice of a larger tensor (big.narrow(1, offset, C), as
// the Inception blocks' backward passes each branch) has rows farther apart than dense: NHWC the larger tensor's
// channel count, NCHW its C * H * W.
inline int64_t row_stride_of(const at::Tensor& t, const BnLayout& L) {
  const int64_t W = t.size(3), H = t.size(2), row = L.channels_last ? L.C : L.C * L.HW;
  // R is read off the first dimension that has more than one index; a dimension of size 1 may have any stride.
  const auto matches = [&](int64_t dim, int64_t stride) { return t.size(dim) == 1 || t.stride(dim) == stride; };
  if (L.channels_last) {
    const int64_t R = W > 1 ? t.stride(3) : H > 1 ? t.stride(2) : L.N > 1 ? t.stride(0) : row;
    const bool ok = R >= row && matches(1, 1) && matches(3, R) && matches(2, W * R) && matches(0, L.HW * R);
    return ok ? R : -1;
  }
  const int64_t R = L.N > 1 ? t.stride(0) : row;
  const bool ok = R >= row && matches(3, 1) && matches(2, W) && matches(1, L.HW) && matches(0, R);
  return ok ? R : -1;
}

// The tensor arguments of both backward pieces, checked and laid out like input. x is dense; grad_out and gate
// are too unless keep_slices, where a channel slice keeps its row stride (the CPU kernels read it in place; the
// CUDA kernels index dense tensors, so their calls keep the default copy).
struct BackwardInputs {
  BnLayout L;
  at::Tensor x, grad_out, gate;
  c10::optional<at::Tensor> mean;
  int64_t grad_row_stride, gate_row_stride;  // see row_stride_of
};

// t itself if keep_slices and its rows lie like a dense tensor's (a channel slice), else a dense copy; and its
// row stride.
inline std::pair<at::Tensor, int64_t> rows_of(const at::Tensor& t, const BnLayout& L, bool keep_slices) {
  const int64_t stride = keep_slices ? row_stride_of(t, L) : -1;
  if (stride > 0) return {t, stride};
  return {t.contiguous(L.format()), L.channels_last ? L.C : L.C * L.HW};
}

inline BackwardInputs backward_inputs(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& mean, bool keep_slices) {
  const BnLayout L = bn_layout(input, "input");
  const at::Tensor x = input.contiguous(L.format());
  TORCH_CHECK(gate.sizes() == x.sizes() && (gate.scalar_type() == at::kByte || gate.scalar_type() == x.scalar_type()),
              "fastcnn: gate must be a uint8 mask or a tensor of input's dtype, shaped like input");
  TORCH_CHECK(gate.device() == x.device(), "fastcnn: gate must be on input's device ", x.device(), ", got ",
              gate.device());
  check_same_as_input(grad_out, x, "grad_out");
  auto [g, g_stride] = rows_of(grad_out, L, keep_slices);
  auto [t, t_stride] = rows_of(gate, L, keep_slices);
  return {L, x, std::move(g), std::move(t), optional_per_channel(mean, input, "mean"), g_stride, t_stride};
}

// Runs the statements `...` with scalar_t (x's dtype) and gate_t (the gate's: uint8 for a mask, else scalar_t)
// defined, as AT_DISPATCH does for one dtype.
#define FASTCNN_DISPATCH_WITH_GATE(x, gate, name, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), name, [&] { \
    if ((gate).scalar_type() == at::kByte) {                                                \
      using gate_t = uint8_t;                                                               \
      __VA_ARGS__;                                                                          \
    } else {                                                                                \
      using gate_t = scalar_t;                                                              \
      __VA_ARGS__;                                                                          \
    }                                                                                       \
  })

// Registers a backend's kernels of the BatchNorm ops, named <op>_<backend> (one list each for the forward and the
// backward ops, so that the CPU and CUDA backends cannot drift apart).
#define FASTCNN_REGISTER_BATCH_NORM_FORWARD_OPS(m, backend)                          \
  m.impl("batch_norm_stats", &stats_op<batch_norm_stats_##backend>);                 \
  m.impl("scale_shift_add_relu", &apply_op<scale_shift_add_relu_##backend>);         \
  m.impl("batch_norm_scale_shift", &batch_norm_scale_shift_##backend);               \
  m.impl("batch_norm_update_running", &batch_norm_update_running_##backend)

#define FASTCNN_REGISTER_BATCH_NORM_BACKWARD_OPS(m, backend)                         \
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_##backend);       \
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_##backend);         \
  m.impl("batch_norm_backward", &batch_norm_backward_##backend)

// Each op's call, prepared the same way on every backend: arguments checked and laid out like input, outputs
// allocated in input's layout. A backend's op then only dispatches on the dtypes and runs its kernels.

// scale_shift_add_relu: out = relu(x * scale + shift + residual), and the uint8 ReLU mask (empty unless save_mask).
struct ApplyCall {
  BnLayout L;
  at::Tensor x;
  c10::optional<at::Tensor> scale, residual;
  at::Tensor shift, out, mask;
};

inline ApplyCall apply_call(const at::Tensor& input, const c10::optional<at::Tensor>& scale, const at::Tensor& shift,
                            const c10::optional<at::Tensor>& residual, bool save_mask) {
  const BnLayout L = bn_layout(input, "input");
  const at::Tensor x = input.contiguous(L.format());
  const at::TensorOptions bytes = x.options().dtype(at::kByte);
  return {L,
          x,
          optional_per_channel(scale, input, "scale"),
          same_as_input(residual, x, L, "residual"),
          optional_per_channel(shift, input, "shift").value(),
          at::empty_like(x, L.format()),
          save_mask ? at::empty_like(x, bytes, L.format()) : at::empty({0}, bytes)};
}

// The ops whose call is the same on every backend up to the work: Run gets the checked, laid-out arguments and
// the allocated outputs (never for an empty input: C = 0, an empty branch of an Inception block).
// batch_norm_stats: Run(L, x, mean, var) writes the per-channel mean and biased variance (accumulation dtype).
template <void (*Run)(const BnLayout&, const at::Tensor&, at::Tensor&, at::Tensor&)>
std::tuple<at::Tensor, at::Tensor> stats_op(const at::Tensor& input) {
  const BnLayout L = bn_layout(input, "input");
  const at::Tensor x = input.contiguous(L.format());
  at::Tensor mean = at::empty({L.C}, x.options().dtype(bn_acc_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  if (x.numel() > 0) Run(L, x, mean, var);
  return {mean, var};
}

// scale_shift_add_relu: Run(call) writes call.out (and call.mask when it has elements).
template <void (*Run)(ApplyCall&)>
std::tuple<at::Tensor, at::Tensor> apply_op(const at::Tensor& input, const c10::optional<at::Tensor>& scale,
                                            const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                                            bool save_mask) {
  ApplyCall c = apply_call(input, scale, shift, residual, save_mask);
  if (c.x.numel() > 0) Run(c);
  return {c.out, c.mask};
}

// batch_norm_backward_reduce: the per-channel sums of dz and dz * (x - mean), in the accumulation dtype.
struct ReduceCall {
  BackwardInputs in;
  at::Tensor sum_dz, sum_dz_xmu;
};

inline ReduceCall reduce_call(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input,
                              const c10::optional<at::Tensor>& mean, bool keep_slices = false) {
  BackwardInputs in = backward_inputs(grad_out, gate, input, mean, keep_slices);
  at::Tensor sum_dz = at::empty({in.L.C}, in.x.options().dtype(bn_acc_dtype(in.x)));
  at::Tensor sum_dz_xmu = at::empty_like(sum_dz);
  return {std::move(in), std::move(sum_dz), std::move(sum_dz_xmu)};
}

// batch_norm_backward_elemt: grad_x = a * (dz - b * (x - mean) - d), and dz itself (empty unless want_dz).
struct ElemtCall {
  BackwardInputs in;
  c10::optional<at::Tensor> a, b, d;
  at::Tensor grad_x, dz;
};

inline ElemtCall elemt_call(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input,
                            const c10::optional<at::Tensor>& mean, const at::Tensor& a,
                            const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& d, bool want_dz,
                            bool keep_slices = false) {
  BackwardInputs in = backward_inputs(grad_out, gate, input, mean, keep_slices);
  at::Tensor grad_x = at::empty_like(in.x, in.L.format());
  at::Tensor dz = want_dz ? at::empty_like(in.x, in.L.format()) : at::empty({0}, in.x.options());
  return {std::move(in), optional_per_channel(a, input, "a"), optional_per_channel(b, input, "b"),
          optional_per_channel(d, input, "d"), std::move(grad_x), std::move(dz)};
}

// batch_norm_backward: BatchNorm's whole input gradient through a ReLU gate in one call: the reduction, the
// per-channel coefficients, then the elementwise pass. grad_bias (sum dz) and grad_weight (first sum dz (x - mean),
// then scaled by invstd) are the reduction's outputs; dz is empty unless want_dz.
struct BackwardCall {
  BackwardInputs in;
  at::Tensor var, weight;
  at::Tensor grad_x, grad_weight, grad_bias, dz;
};

inline BackwardCall backward_call(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input,
                                  const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                                  bool want_dz, bool keep_slices = false) {
  ReduceCall r = reduce_call(grad_out, gate, input, mean, keep_slices);
  check_per_channel(var, input, "var");
  check_per_channel(weight, input, "weight");
  at::Tensor grad_x = at::empty_like(r.in.x, r.in.L.format());
  at::Tensor dz = want_dz ? at::empty_like(r.in.x, r.in.L.format()) : at::empty({0}, r.in.x.options());
  return {std::move(r.in), var.contiguous(), weight.contiguous(), std::move(grad_x), std::move(r.sum_dz_xmu),
          std::move(r.sum_dz), std::move(dz)};
}

// batch_norm_scale_shift: scale = weight / sqrt(var + eps), shift = bias - mean * scale, per channel (all four of
// one shape (C,), one floating dtype and device).
inline void check_scale_shift_args(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                                   const at::Tensor& var) {
  for (const auto* t : {&bias, &mean, &var}) {
    TORCH_CHECK(t->sizes() == weight.sizes() && t->scalar_type() == weight.scalar_type() &&
                    t->device() == weight.device(),
                "fastcnn: weight, bias, mean and var must share one shape, dtype and device, got ", weight.sizes(),
                " ", weight.scalar_type(), " and ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(weight.dim() == 1 && at::isFloatingType(weight.scalar_type()),
              "fastcnn: weight, bias, mean and var must be 1-D floating-point tensors, got ", weight.sizes(), " ",
              weight.scalar_type());
}

// batch_norm_update_running: the running statistics updated in place, running = running * (1 - factor) + batch *
// factor, with the unbiased batch variance var * count / (count - 1); buffers and batch statistics of one dtype
// (float32 or float64), shape and device, the buffers dense.
inline void check_running_args(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                               const at::Tensor& var, int64_t count) {
  for (const auto* t : {&running_var, &mean, &var}) {
    TORCH_CHECK(t->sizes() == running_mean.sizes() && t->scalar_type() == running_mean.scalar_type() &&
                    t->device() == running_mean.device(),
                "fastcnn: running_mean, running_var, mean and var must share one shape, dtype and device, got ",
                running_mean.sizes(), " ", running_mean.scalar_type(), " and ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(running_mean.dim() == 1 && (running_mean.scalar_type() == at::kFloat ||
                                          running_mean.scalar_type() == at::kDouble),
              "fastcnn: the running statistics must be 1-D float32 or float64, got ", running_mean.sizes(), " ",
              running_mean.scalar_type());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "fastcnn: the running statistics must be contiguous");
  TORCH_CHECK(count > 1, "fastcnn: the unbiased variance needs more than one value per channel, got ", count);
}

}  // namespace fastcnn
