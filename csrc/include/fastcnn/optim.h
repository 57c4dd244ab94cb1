// Host-side pieces of the fused optimizer ops shared by the CPU (cpu/optim.cpp) and CUDA (cuda/optim.cu) kernels: the
// ops' entry points (schema arguments, the state lists each op reads, the argument checks) and their registration,
// and the reading of the optional 0-dim tensors. The update rules themselves are in optim_math.h.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

namespace fastcnn {
namespace optim {

// A state list of an op (exp_avgs, momentum_buffers, ...) and whether this call uses it: an unused list (e.g.
// max_exp_avg_sqs without amsgrad, momentum_buffers without momentum) may be empty and is not looked at.
struct StateList {
  const char* name;
  at::TensorList tensors;
  bool used;
};

inline bool is_low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// The dtype of params[i]'s state tensors (all of them share one): the param's, or float32 beside bf16/fp16 params.
inline at::ScalarType state_dtype(const at::Tensor& param, const std::vector<StateList>& states, size_t i) {
  for (const auto& s : states) {
    if (s.used) return s.tensors[i].scalar_type();
  }
  return param.scalar_type();
}

inline void check_scalar_tensor(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                const at::Device& device) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 0, "fastcnn.", op, ": ", name, " must be a 0-dim tensor, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "fastcnn.", op, ": ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == device, "fastcnn.", op, ": ", name, " is on ", t->device(), " but params[0] is on ",
              device, "; every tensor must be on one device");
}

// Every check the kernels' memory safety relies on, with messages naming the argument. Returns the device (CPU
// when the lists are empty).
inline at::Device check_optimizer_args(const char* op, at::TensorList params, at::TensorList grads,
                                       const std::vector<StateList>& states, at::TensorList steps, bool has_steps,
                                       const c10::optional<at::Tensor>& lr_tensor,
                                       const c10::optional<at::Tensor>& grad_scale,
                                       const c10::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "fastcnn.", op, ": grads has ", grads.size(), " tensors but params has ", n);
  for (const auto& s : states) {
    TORCH_CHECK(!s.used || s.tensors.size() == n, "fastcnn.", op, ": ", s.name, " has ", s.tensors.size(),
                " tensors but params has ", n);
  }
  TORCH_CHECK(!has_steps || steps.size() == n, "fastcnn.", op, ": steps has ", steps.size(),
              " tensors but params has ", n);
  const at::Device device = n > 0 ? params[0].device() : at::Device(at::kCPU);
  const auto same_device = [&](const at::Tensor& t, const char* name, size_t i) {
    TORCH_CHECK(t.defined(), "fastcnn.", op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == device, "fastcnn.", op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[0] is on ", device, "; every tensor must be on one device");
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    same_device(p, "params", i);
    TORCH_CHECK(is_param_dtype(p.scalar_type()), "fastcnn.", op, ": params[", i,
                "] must be float16, bfloat16, float32 or float64, got ", p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(), "fastcnn.", op, ": params[", i,
                "] must be dense (strided, non-overlapping, no gaps)");
    const auto like_param = [&](const at::Tensor& t, const char* name) {
      same_device(t, name, i);
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fastcnn.", op, ": ", name, "[", i,
                  "] must have the shape and strides of params[", i, "] (", p.sizes(), ", ", p.strides(), "), got ",
                  t.sizes(), ", ", t.strides());
    };
    like_param(grads[i], "grads");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fastcnn.", op, ": grads[", i,
                "] must have the dtype of params[", i, "] (", p.scalar_type(), "), got ", grads[i].scalar_type());
    at::ScalarType st = at::ScalarType::Undefined;
    for (const auto& s : states) {
      if (!s.used) continue;
      const at::Tensor& t = s.tensors[i];
      like_param(t, s.name);
      const at::ScalarType dt = t.scalar_type();
      TORCH_CHECK(dt == p.scalar_type() || (dt == at::kFloat && is_low_precision(p.scalar_type())), "fastcnn.", op,
                  ": ", s.name, "[", i, "] must have the dtype of params[", i, "] (", p.scalar_type(),
                  ") or be float32 beside a bfloat16/float16 param, got ", dt);
      TORCH_CHECK(st == at::ScalarType::Undefined || dt == st, "fastcnn.", op, ": the state tensors of params[", i,
                  "] must share one dtype, got ", st, " and ", dt, " (", s.name, ")");
      st = dt;
    }
    if (has_steps) {
      const at::Tensor& s = steps[i];
      same_device(s, "steps", i);
      TORCH_CHECK(s.dim() == 0 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble), "fastcnn.", op,
                  ": steps[", i, "] must be a 0-dim float32 or float64 tensor, got ", s.scalar_type(), " of shape ",
                  s.sizes());
      TORCH_CHECK(s.scalar_type() == steps[0].scalar_type(), "fastcnn.", op, ": every step must have one dtype, "
                  "steps[0] is ", steps[0].scalar_type(), " and steps[", i, "] is ", s.scalar_type());
    }
  }
  check_scalar_tensor(op, "lr_tensor", lr_tensor, device);
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  return device;
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Calls f((P*)nullptr, (S*)nullptr) with the C++ types of a tensor's param and state dtypes (checked beforehand).
template <typename F>
auto with_dtypes(at::ScalarType param, at::ScalarType state, F&& f) {
  switch (param) {
    case at::kDouble: return f(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    case at::kBFloat16:
      return state == at::kFloat ? f(static_cast<c10::BFloat16*>(nullptr), static_cast<float*>(nullptr))
                                 : f(static_cast<c10::BFloat16*>(nullptr), static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf:
      return state == at::kFloat ? f(static_cast<c10::Half*>(nullptr), static_cast<float*>(nullptr))
                                 : f(static_cast<c10::Half*>(nullptr), static_cast<c10::Half*>(nullptr));
    default:
      TORCH_CHECK(param == at::kFloat, "fastcnn: unsupported param dtype ", param);
      return f(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
  }
}

using OptionalTensor = c10::optional<at::Tensor>;

// One checked call of an op: its tensor lists (the state lists in the op's order, each with whether this call uses
// it), its steps (empty for the ops without), its optional 0-dim tensors and the device of them all. Non-empty.
struct Call {
  at::TensorList params, grads;
  std::vector<StateList> states;
  at::TensorList steps;
  const OptionalTensor &lr_tensor, &grad_scale, &found_inf;
  at::Device device;
};

// The ops' scalar arguments (schemas in csrc/fastcnn.cpp).
struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
};
struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};
struct AdagradHyper {
  double lr, lr_decay, weight_decay, eps;
  bool maximize;
};
struct LarsHyper {
  double lr, momentum, dampening, weight_decay, trust_coefficient, eps;
  bool nesterov, maximize, trust_clip, update_norm, lr_in_momentum, first_step;
};

// The ops as registered for one device whose kernels are Kernels::adam/sgd/adagrad/lars(const Call&, const XHyper&):
// the schema's arguments, the state lists each op reads (and when), and the checks, the same for every device. An
// empty call (no params) returns after the checks.
template <typename Kernels>
struct Entry {
  template <typename Run>
  static void run_checked(const char* op, at::TensorList params, at::TensorList grads, std::vector<StateList> states,
                          at::TensorList steps, bool has_steps, const OptionalTensor& lr_tensor,
                          const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const Run& run) {
    const at::Device device =
        check_optimizer_args(op, params, grads, states, steps, has_steps, lr_tensor, grad_scale, found_inf);
    if (!params.empty()) run(Call{params, grads, std::move(states), steps, lr_tensor, grad_scale, found_inf, device});
  }

  static void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, double lr, const OptionalTensor& lr_tensor,
                    double beta1, double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    run_checked("adam_", params, grads,
                {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                 {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
                steps, true, lr_tensor, grad_scale, found_inf, [&](const Call& call) {
                  Kernels::adam(call, AdamHyper{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                                                decoupled_weight_decay});
                });
  }

  static void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   const OptionalTensor& lr_tensor, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool is_first_step, const OptionalTensor& grad_scale,
                   const OptionalTensor& found_inf) {
    run_checked("sgd_", params, grads, {{"momentum_buffers", momentum_buffers, momentum != 0}}, {}, false, lr_tensor,
                grad_scale, found_inf, [&](const Call& call) {
                  Kernels::sgd(call, SgdHyper{lr, momentum, dampening, weight_decay, nesterov, maximize,
                                              is_first_step});
                });
  }

  static void adagrad_(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                       double lr, const OptionalTensor& lr_tensor, double lr_decay, double weight_decay, double eps,
                       bool maximize, const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
    run_checked("adagrad_", params, grads, {{"state_sums", state_sums, true}}, steps, true, lr_tensor, grad_scale,
                found_inf, [&](const Call& call) {
                  Kernels::adagrad(call, AdagradHyper{lr, lr_decay, weight_decay, eps, maximize});
                });
  }

  static void lars_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                    const OptionalTensor& lr_tensor, double momentum, double dampening, double weight_decay,
                    double trust_coefficient, double eps, bool nesterov, bool maximize, bool trust_clip,
                    bool update_norm, bool lr_in_momentum, bool is_first_step, const OptionalTensor& grad_scale,
                    const OptionalTensor& found_inf) {
    // Momentum buffers are read with momentum and with lr_in_momentum.
    run_checked("lars_", params, grads, {{"momentum_buffers", momentum_buffers, lr_in_momentum || momentum != 0}},
                {}, false, lr_tensor, grad_scale, found_inf, [&](const Call& call) {
                  Kernels::lars(call, LarsHyper{lr, momentum, dampening, weight_decay, trust_coefficient, eps,
                                                nesterov, maximize, trust_clip, update_norm, lr_in_momentum,
                                                is_first_step});
                });
  }
};

// TORCH_LIBRARY_IMPL(fastcnn, <device>, m) { optim::register_ops<Kernels>(m); }
template <typename Kernels>
void register_ops(torch::Library& m) {
  m.impl("adam_", &Entry<Kernels>::adam_);
  m.impl("sgd_", &Entry<Kernels>::sgd_);
  m.impl("adagrad_", &Entry<Kernels>::adagrad_);
  m.impl("lars_", &Entry<Kernels>::lars_);
}

}  // namespace optim
}  // namespace fastcnn
