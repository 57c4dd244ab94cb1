// Layout and argument checks shared by the CPU and CUDA kernels of the fused BatchNorm pieces.
#pragma once

#include <ATen/ATen.h>

#include "fastcnn/checks.h"


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

// A tensor of x's shape, dtype and device, in x's layout.
inline c10::optional<at::Tensor> same_as_input(const c10::optional<at::Tensor>& t, const at::Tensor& x,
                                               const BnLayout& L, const char* name) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
              "fastcnn: ", name, " must match input's shape, dtype and device (", x.sizes(), ", ", x.scalar_type(),
              "), got ", t->sizes(), ", ", t->scalar_type());
  return t->contiguous(L.format());
}

// The tensor arguments of both backward pieces, checked and laid out like input.
struct BackwardInputs {
  BnLayout L;
  at::Tensor x, grad_out, gate;
  c10::optional<at::Tensor> mean;
};

inline BackwardInputs backward_inputs(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& mean) {
  const BnLayout L = bn_layout(input, "input");
  const at::Tensor x = input.contiguous(L.format());
  TORCH_CHECK(gate.sizes() == x.sizes() && (gate.scalar_type() == at::kByte || gate.scalar_type() == x.scalar_type()),
              "fastcnn: gate must be a uint8 mask or a tensor of input's dtype, shaped like input");
  return {L, x, same_as_input(grad_out, x, L, "grad_out").value(), gate.contiguous(L.format()),
          optional_per_channel(mean, input, "mean")};
}

// Calls f(scalar_t{}, gate_t{}) for x's dtype and the gate's (uint8 mask or x's dtype).
template <typename F>
void dispatch_with_gate(const at::Tensor& x, const at::Tensor& gate, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward", [&] {
    if (gate.scalar_type() == at::kByte) {
      f(scalar_t(0), uint8_t(0));
    } else {
      f(scalar_t(0), scalar_t(0));
    }
  });
}

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

// batch_norm_backward_reduce: the per-channel sums of dz and dz * (x - mean), in the accumulation dtype.
struct ReduceCall {
  BackwardInputs in;
  at::Tensor sum_dz, sum_dz_xmu;
};

inline ReduceCall reduce_call(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& input,
                              const c10::optional<at::Tensor>& mean) {
  BackwardInputs in = backward_inputs(grad_out, gate, input, mean);
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
                            const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& d, bool want_dz) {
  BackwardInputs in = backward_inputs(grad_out, gate, input, mean);
  at::Tensor grad_x = at::empty_like(in.x, in.L.format());
  at::Tensor dz = want_dz ? at::empty_like(in.x, in.L.format()) : at::empty({0}, in.x.options());
  return {std::move(in), optional_per_channel(a, input, "a"), optional_per_channel(b, input, "b"),
          optional_per_channel(d, input, "d"), std::move(grad_x), std::move(dz)};
}

}  // namespace fastcnn
