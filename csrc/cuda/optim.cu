// CUDA kernels of the fused optimizer steps fastcnn::adam_, sgd_, adagrad_ and lars_; cpu/optim.cpp is the
// behavioural model (same checks, same per-element math from optim_math.h, hence the same rounding: every operation
// rounds on its own, __fmul_rn & co., never contracted to an FMA).
//
// Launches. The tensors are grouped by dtype signature (param dtype, state dtype); per group, one launch for Adam,
// SGD and Adagrad and two for LARS, over the group's work table (multi_tensor.cuh): a persistent grid of kBlock-thread
// blocks, block b taking work items b, b + gridDim, ...; per item the block runs one chunk of kChunk elements of one
// tensor, kILP elements per thread per access (16-byte vectors where every pointer of the tensor is aligned, a scalar
// tail; strided scalar accesses otherwise). Everything runs on the current stream with no host sync and no host read
// of a device value: found_inf, grad_scale, lr_tensor and the steps are read by the kernels, so a step can be
// captured in a CUDA graph (after a warm-up step has built the work table; see multi_tensor.cuh).
//
// found_inf: every block reads it first and returns when it is nonzero, so nothing at all is written (steps included).
//
// Steps (Adam, Adagrad) are incremented inside the one launch. Every chunk of a tensor needs t = step + 1, and the
// blocks of one tensor run in no particular order, so the step must not change before the last of them has read it.
// claim_step: thread 0 of the block running a chunk reads the step, computes t (in the step's dtype, as step += 1
// does), fences, and adds 1 to the tensor's chunk counter (an integer atomic); the chunk that brings the counter to a
// multiple of the tensor's chunk count is the last to have read the step, and it alone writes t. Counters are never
// reset (each launch adds exactly the tensor's chunk count), so a captured graph needs no reset node. The value
// written does not depend on which block is last: the result is deterministic.
//
// LARS: launch 1 writes each chunk's float64 partial sums (sum p^2, sum of the gradient term^2) to a compact buffer
// indexed by work item (a tensor's partials are contiguous); launch 2, one block per tensor, sums the tensor's
// partials once in a fixed order (thread k sums partials k, k + kBlock, ..., then a fixed block tree) and stores the
// tensor's trust ratio; launch 3, over the items in reverse order (the last chunks launch 1 read are still in L2),
// applies the update with its tensor's ratio. Each partial is read once (a tensor of c chunks costs O(c), where
// re-summing in every chunk's block cost O(c^2)). No float atomics, deterministic.
#ifdef FASTCNN_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastcnn/multi_tensor.cuh"
#include "fastcnn/optim.h"

#include <cmath>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastcnn {
namespace optim_cuda {

#include "fastcnn/optim_math.h"

namespace {

using mta::kBlock;

enum OpTag : int { kAdamOp = 1, kSgdOp = 2, kAdagradOp = 3, kLarsOp = 4 };

// The 0-dim tensors and flags every kernel reads (device pointers, or null when not given).
struct Common {
  const float* found_inf;
  const float* grad_scale;
  const float* lr_tensor;
  double lr;
  bool maximize;
};

__device__ __forceinline__ bool skip_step(const Common& c) { return c.found_inf != nullptr && *c.found_inf != 0.0f; }
__device__ __forceinline__ double lr_of(const Common& c) {
  return c.lr_tensor != nullptr ? static_cast<double>(*c.lr_tensor) : c.lr;
}
__device__ __forceinline__ double scale_of(const Common& c) {
  return c.grad_scale != nullptr ? static_cast<double>(*c.grad_scale) : 1.0;
}

// Thread 0 only: t = step + 1 for the tensor of `rec`; the tensor's last chunk to get here writes t (see the top).
__device__ double claim_step(const int64_t* rec, int depth, unsigned long long* counter, bool step_is_double) {
  void* const step = reinterpret_cast<void*>(rec[depth + mta::kStepPtr]);
  const double t = step_is_double ? __ldcg(static_cast<const double*>(step)) + 1.0
                                  : static_cast<double>(__ldcg(static_cast<const float*>(step)) + 1.0f);
  __threadfence();  // the read above happens before this chunk counts as having read
  const unsigned long long chunks = static_cast<unsigned long long>(rec[depth + mta::kNumChunks]);
  const unsigned long long before = atomicAdd(counter, 1ull);
  if ((before + 1) % chunks == 0) {
    __threadfence();
    if (step_is_double) {
      *static_cast<double*>(step) = t;
    } else {
      *static_cast<float*>(step) = static_cast<float>(t);
    }
  }
  return t;
}

// Work item w of a table: its tensor, the chunk of it, and the tensor's record.
struct Item {
  int tensor;
  int64_t chunk;
  const int64_t* rec;
};

__device__ __forceinline__ Item decode(const mta::View& view, int64_t w) {
  const int64_t item = view.items[w];
  const int tensor = static_cast<int>(item >> 32);
  return Item{tensor, item & 0xffffffffll, view.records + static_cast<int64_t>(tensor) * view.stride};
}

// --- Adam -------------------------------------------------------------------------------------------------------
struct AdamParams {
  Common common;
  double beta1, beta2, weight_decay, eps;
  int wd_mode;
  bool step_is_double;
};

template <typename P, typename S, bool kAmsgrad>
__global__ void __launch_bounds__(kBlock) adam_kernel(mta::View view, AdamParams a) {
  using T = at::opmath_type<P>;
  constexpr int kDepth = kAmsgrad ? 5 : 4;
  if (skip_step(a.common)) return;
  const double lr = lr_of(a.common), scale = scale_of(a.common);
  const bool unscale = a.common.grad_scale != nullptr, maximize = a.common.maximize;
  const unsigned store = (1u << kDepth) - 1u - (unscale ? 0u : 2u);  // everything but the grad unless unscaling
  __shared__ double bias[2];
  for (int64_t w = blockIdx.x; w < view.num_items; w += gridDim.x) {
    const auto [tensor, chunk, rec] = decode(view, w);
    if (threadIdx.x == 0) {
      const double t = claim_step(rec, kDepth, view.counters + tensor, a.step_is_double);
      adam_bias_corrections(lr, a.beta1, a.beta2, t, bias[0], bias[1]);
    }
    __syncthreads();
    const AdamCoeffs<T> c = make_adam_coeffs<T>(scale, lr, a.beta1, a.beta2, a.weight_decay, a.eps, bias[0], bias[1]);
    mta::for_chunk<kDepth, mta::ilp_for<P>(), P, S, T>(rec, kDepth, chunk, store, [&](T (&e)[kDepth]) {
      T unused = T(0);
      T& vmax = kAmsgrad ? e[kDepth - 1] : unused;
      adam_update(e[0], e[1], e[2], e[3], vmax, a.wd_mode, kAmsgrad, unscale, maximize, c);
    });
    __syncthreads();  // bias[] is rewritten by the next item
  }
}

// --- SGD --------------------------------------------------------------------------------------------------------
struct SgdParams {
  Common common;
  double momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

template <typename P, typename S, bool kMomentum>
__global__ void __launch_bounds__(kBlock) sgd_kernel(mta::View view, SgdParams a) {
  using T = at::opmath_type<P>;
  constexpr int kDepth = kMomentum ? 3 : 2;
  if (skip_step(a.common)) return;
  const bool unscale = a.common.grad_scale != nullptr, maximize = a.common.maximize;
  const bool has_wd = a.weight_decay != 0, nesterov = a.nesterov, first = a.first_step;
  const SgdCoeffs<T> c =
      make_sgd_coeffs<T>(scale_of(a.common), lr_of(a.common), a.momentum, a.dampening, a.weight_decay);
  const unsigned store = (1u << kDepth) - 1u - (unscale ? 0u : 2u);
  for (int64_t w = blockIdx.x; w < view.num_items; w += gridDim.x) {
    const auto [tensor, chunk, rec] = decode(view, w);
    mta::for_chunk<kDepth, mta::ilp_for<P>(), P, S, T>(rec, kDepth, chunk, store, [&](T (&e)[kDepth]) {
      T unused = T(0);
      T& b = kMomentum ? e[kDepth - 1] : unused;
      sgd_update(e[0], e[1], b, has_wd, kMomentum, nesterov, first, unscale, maximize, c);
    });
  }
}

// --- Adagrad ----------------------------------------------------------------------------------------------------
struct AdagradParams {
  Common common;
  double lr_decay, weight_decay, eps;
  bool step_is_double;
};

template <typename P, typename S>
__global__ void __launch_bounds__(kBlock) adagrad_kernel(mta::View view, AdagradParams a) {
  using T = at::opmath_type<P>;
  constexpr int kDepth = 3;
  if (skip_step(a.common)) return;
  const double lr = lr_of(a.common), scale = scale_of(a.common);
  const bool unscale = a.common.grad_scale != nullptr, maximize = a.common.maximize, has_wd = a.weight_decay != 0;
  const unsigned store = (1u << kDepth) - 1u - (unscale ? 0u : 2u);
  __shared__ double clr;
  for (int64_t w = blockIdx.x; w < view.num_items; w += gridDim.x) {
    const auto [tensor, chunk, rec] = decode(view, w);
    if (threadIdx.x == 0) {
      clr = adagrad_clr(lr, a.lr_decay, claim_step(rec, kDepth, view.counters + tensor, a.step_is_double));
    }
    __syncthreads();
    const AdagradCoeffs<T> c = make_adagrad_coeffs<T>(scale, a.weight_decay, clr, a.eps);
    mta::for_chunk<kDepth, mta::ilp_for<P>(), P, S, T>(rec, kDepth, chunk, store, [&](T (&e)[kDepth]) {
      adagrad_update(e[0], e[1], e[2], has_wd, unscale, maximize, c);
    });
    __syncthreads();
  }
}

// --- LARS -------------------------------------------------------------------------------------------------------
struct LarsParams {
  Common common;
  double momentum, dampening, weight_decay, trust_coefficient, eps;
  bool nesterov, trust_clip, update_norm, first_step;
};

// Launch 1: partials[2w], partials[2w + 1] = sum over work item w's chunk of p^2 and of lars_norm_term^2, in float64.
template <typename P>
__global__ void __launch_bounds__(kBlock) lars_norms_kernel(mta::View view, LarsParams a, double* partials) {
  using T = at::opmath_type<P>;
  if (skip_step(a.common)) return;
  const T scale = T(scale_of(a.common)), wd = T(a.weight_decay);
  const bool unscale = a.common.grad_scale != nullptr, maximize = a.common.maximize, update_norm = a.update_norm;
  __shared__ double scratch[2 * kBlock / 32];
  for (int64_t w = blockIdx.x; w < view.num_items; w += gridDim.x) {
    const auto [tensor, chunk, rec] = decode(view, w);
    double sw = 0, sg = 0;
    mta::for_chunk<2, mta::ilp_for<P>(), P, P, T>(rec, view.stride - mta::kExtraWords, chunk, 0u, [&](T (&e)[2]) {
      const T u = lars_norm_term(e[0], e[1], update_norm, unscale, maximize, scale, wd);
      sw += static_cast<double>(e[0]) * static_cast<double>(e[0]);
      sg += static_cast<double>(u) * static_cast<double>(u);
    });
    mta::block_sum2(sw, sg, scratch);
    if (threadIdx.x == 0) {
      partials[2 * w] = sw;
      partials[2 * w + 1] = sg;
    }
  }
}

// Launch 2: ratios[t] = the trust ratio of tensor t, from its norms summed over its partials (one block per tensor).
template <typename P>
__global__ void __launch_bounds__(kBlock)
    lars_ratio_kernel(mta::View view, int64_t num_tensors, LarsParams a, const double* __restrict__ partials,
                      double* __restrict__ ratios) {
  using T = at::opmath_type<P>;
  if (skip_step(a.common)) return;
  const double lr = lr_of(a.common);
  __shared__ double scratch[2 * kBlock / 32];
  for (int64_t t = blockIdx.x; t < num_tensors; t += gridDim.x) {
    const int64_t* rec = view.records + t * view.stride;
    const int depth = view.stride - mta::kExtraWords;
    const int64_t first_item = rec[depth + mta::kFirstItem], chunks = rec[depth + mta::kNumChunks];
    double sw = 0, sg = 0;
    for (int64_t k = threadIdx.x; k < chunks; k += kBlock) {
      sw += partials[2 * (first_item + k)];
      sg += partials[2 * (first_item + k) + 1];
    }
    mta::block_sum2(sw, sg, scratch);
    if (threadIdx.x == 0) {
      ratios[t] = static_cast<double>(lars_trust_ratio<T>(T(sqrt_(sw)), T(sqrt_(sg)), T(a.trust_coefficient),
                                                          T(a.weight_decay), T(a.eps), T(lr), a.update_norm,
                                                          a.trust_clip));
    }
  }
}

// Launch 3: per item (in reverse order) the update with its tensor's trust ratio.
// kMode: 0 plain, 1 momentum, 2 lr_in_momentum.
template <typename P, typename S, int kMode>
__global__ void __launch_bounds__(kBlock) lars_kernel(mta::View view, LarsParams a, const double* ratios) {
  using T = at::opmath_type<P>;
  constexpr int kDepth = kMode != 0 ? 3 : 2;
  if (skip_step(a.common)) return;
  const double lr = lr_of(a.common), scale = scale_of(a.common);
  const bool unscale = a.common.grad_scale != nullptr, maximize = a.common.maximize;
  const bool nesterov = a.nesterov, first = a.first_step;
  const unsigned store = (1u << kDepth) - 1u - (unscale ? 0u : 2u);
  for (int64_t w = blockIdx.x; w < view.num_items; w += gridDim.x) {
    const auto [tensor, chunk, rec] = decode(view, view.num_items - 1 - w);
    const LarsCoeffs<T> c = make_lars_coeffs<T>(scale, lr, a.momentum, a.dampening, a.weight_decay, ratios[tensor]);
    mta::for_chunk<kDepth, mta::ilp_for<P>(), P, S, T>(rec, kDepth, chunk, store, [&](T (&e)[kDepth]) {
      T unused = T(0);
      T& b = kMode != 0 ? e[kDepth - 1] : unused;
      lars_update(e[0], e[1], b, kMode == 1, kMode == 2, nesterov, first, unscale, maximize, c);
    });
  }
}

// --- host side --------------------------------------------------------------------------------------------------
const float* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return optim::has(t) ? t->const_data_ptr<float>() : nullptr;
}

Common common_of(const optim::Call& call, double lr, bool maximize) {
  return Common{ptr_or_null(call.found_inf), ptr_or_null(call.grad_scale), ptr_or_null(call.lr_tensor), lr, maximize};
}

// The call's tensors split by dtype signature (param dtype, state dtype), in order of first appearance: each group
// holds the indices of its tensors.
std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>> group_by_dtypes(
    at::TensorList params, const std::vector<optim::StateList>& states) {
  std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto sig = std::make_pair(params[i].scalar_type(), optim::state_dtype(params[i], states, i));
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == sig; });
    if (it == groups.end()) {
      groups.push_back({sig, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  return groups;
}

// The group's lists (params, grads, then the used states, in order) and element sizes.
struct GroupLists {
  std::vector<std::vector<at::Tensor>> lists;
  std::vector<int64_t> elem_size;
  std::vector<at::Tensor> steps;
};

GroupLists gather(const std::vector<size_t>& idx, at::TensorList params, at::TensorList grads,
                  const std::vector<optim::StateList>& states, at::TensorList steps) {
  GroupLists g;
  const auto add_list = [&](at::TensorList list) {
    std::vector<at::Tensor> l;
    l.reserve(idx.size());
    for (size_t i : idx) l.push_back(list[i]);
    g.elem_size.push_back(static_cast<int64_t>(l.front().element_size()));
    g.lists.push_back(std::move(l));
  };
  add_list(params);
  add_list(grads);
  for (const auto& s : states) {
    if (s.used) add_list(s.tensors);
  }
  if (!steps.empty()) {
    for (size_t i : idx) g.steps.push_back(steps[i]);
  }
  return g;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t items, Args&&... args) {
  const int grid = mta::grid_for(kernel, items);
  kernel<<<grid, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool B>
using Bool = std::integral_constant<bool, B>;

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(Bool<true>{});
  } else {
    f(Bool<false>{});
  }
}

bool steps_are_double(at::TensorList steps) { return !steps.empty() && steps[0].scalar_type() == at::kDouble; }

// On the call's device, calls `launch_group(table, P*, S*)` once per dtype group (param dtype P, state dtype S; null
// pointers that carry the types) with the group's multi-tensor table: params, grads, then the used state lists, and
// the steps when the op has them.
template <typename LaunchGroup>
void for_each_dtype_group(OpTag op, const optim::Call& call, const LaunchGroup& launch_group) {
  TORCH_CHECK(call.device.is_cuda(), "fastcnn: the CUDA optimizer kernel got tensors on ", call.device);
  const c10::cuda::CUDAGuard guard(call.device);
  for (const auto& group : group_by_dtypes(call.params, call.states)) {
    const GroupLists g = gather(group.second, call.params, call.grads, call.states, call.steps);
    optim::with_dtypes(group.first.first, group.first.second, [&](auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      launch_group(*mta::get_table(op, g.lists, g.elem_size, g.steps, mta::ilp_for<P>()), pt, st);
    });
  }
}

// The kernels behind the ops' entry points (optim.h: schema arguments and checks).
struct CudaKernels {
  static void adam(const optim::Call& call, const optim::AdamHyper& h) {
    const AdamParams a{common_of(call, h.lr, h.maximize), h.beta1, h.beta2, h.weight_decay, h.eps,
                       h.weight_decay == 0 ? kNoDecay : (h.decoupled_weight_decay ? kDecoupledDecay : kL2Decay),
                       steps_are_double(call.steps)};
    for_each_dtype_group(kAdamOp, call, [&](const mta::Table& table, auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      using S = std::remove_pointer_t<decltype(st)>;
      with_bool(h.amsgrad, [&](auto ams) {
        launch(adam_kernel<P, S, decltype(ams)::value>, table.num_items, table.view(), a);
      });
    });
  }

  static void sgd(const optim::Call& call, const optim::SgdHyper& h) {
    const SgdParams a{common_of(call, h.lr, h.maximize), h.momentum, h.dampening, h.weight_decay, h.nesterov,
                      h.first_step};
    for_each_dtype_group(kSgdOp, call, [&](const mta::Table& table, auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      using S = std::remove_pointer_t<decltype(st)>;
      with_bool(h.momentum != 0, [&](auto mom) {
        launch(sgd_kernel<P, S, decltype(mom)::value>, table.num_items, table.view(), a);
      });
    });
  }

  static void adagrad(const optim::Call& call, const optim::AdagradHyper& h) {
    const AdagradParams a{common_of(call, h.lr, h.maximize), h.lr_decay, h.weight_decay, h.eps,
                          steps_are_double(call.steps)};
    for_each_dtype_group(kAdagradOp, call, [&](const mta::Table& table, auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      using S = std::remove_pointer_t<decltype(st)>;
      launch(adagrad_kernel<P, S>, table.num_items, table.view(), a);
    });
  }

  static void lars(const optim::Call& call, const optim::LarsHyper& h) {
    const int mode = h.lr_in_momentum ? 2 : (h.momentum != 0 ? 1 : 0);
    const LarsParams a{common_of(call, h.lr, h.maximize), h.momentum, h.dampening, h.weight_decay,
                       h.trust_coefficient, h.eps, h.nesterov, h.trust_clip, h.update_norm, h.first_step};
    for_each_dtype_group(kLarsOp, call, [&](const mta::Table& table, auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      using S = std::remove_pointer_t<decltype(st)>;
      // The norms kernel reads only params and grads: the same table, whose first two lists they are. One float64
      // buffer: 2 partials per work item, then one trust ratio per tensor.
      const at::Tensor scratch =
          at::empty({2 * table.num_items + table.num_tensors}, call.params[0].options().dtype(at::kDouble));
      double* partials = scratch.mutable_data_ptr<double>();
      double* ratios = partials + 2 * table.num_items;
      launch(lars_norms_kernel<P>, table.num_items, table.view(), a, partials);
      launch(lars_ratio_kernel<P>, table.num_tensors, table.view(), table.num_tensors, a,
             static_cast<const double*>(partials), ratios);
      const double* r = ratios;
      switch (mode) {
        case 0: launch(lars_kernel<P, S, 0>, table.num_items, table.view(), a, r); break;
        case 1: launch(lars_kernel<P, S, 1>, table.num_items, table.view(), a, r); break;
        default: launch(lars_kernel<P, S, 2>, table.num_items, table.view(), a, r); break;
      }
    });
  }
};

}  // namespace
}  // namespace optim_cuda
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) { fastcnn::optim::register_ops<fastcnn::optim_cuda::CudaKernels>(m); }

#endif  // FASTCNN_WITH_CUDA
