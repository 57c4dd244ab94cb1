// CPU kernels of the fused optimizer steps fastcnn::adam_, sgd_, adagrad_ and lars_ (schemas in fastcnn.cpp, rules in
// fastcnn/reference/optim.py, per-element math in optim_math.h).
//
// Work split: every tensor is cut into spans of kSpan elements and one parallel loop (torch's intra-op threads, see
// parallel_items) runs over all spans of all tensors, so many small tensors (biases, norms) cost no more than one
// large one. Each span calls the loop picked for its tensor's dtypes (param, state: float32 state beside bf16/fp16
// params is allowed) and on the presence of the state lists it reads (amsgrad, momentum: template parameters; the
// other flags are loop-invariant branches): AVX2 lanes (8 floats / 4 doubles, no FMA) where the machine has AVX2 and
// F16C, else a baseline copy of the same loops. Math runs in opmath (float32 for bf16/fp16, float64 for float64),
// rounding on store, one rounding per operation in the oracle's order: results equal the oracle's bit for bit, except
// where it rounds differently itself (its CPU tensor.sqrt() can be an ulp off; LARS's norms sum in another order).
//
// Scalars: found_inf, lr_tensor and grad_scale are read once on the host (a CPU scalar); steps are read, incremented
// and written on the host before the parallel pass, and the bias corrections / Adagrad's clr formed from them in
// float64. LARS takes two passes: per-span partial sums of squares (float64, into a buffer), summed per tensor in span
// order (deterministic whatever the thread count), then the update.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "fastcnn/cpu_loops.h"
#include "fastcnn/optim.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCNN_OPTIM_AVX2 1
#include <immintrin.h>
#else
#define FASTCNN_OPTIM_AVX2 0
#endif

namespace fastcnn {
namespace optim_cpu {

// The op arguments as the loops read them (doubles, rounded to opmath inside the loops).
struct AdamArgs {
  double scale, lr, beta1, beta2, weight_decay, eps;
  int wd_mode;  // WeightDecayMode
  bool maximize, unscale;
};
struct SgdArgs {
  double scale, lr, momentum, dampening, weight_decay;
  bool nesterov, first_step, maximize, unscale;
};
struct AdagradArgs {
  double scale, weight_decay, eps;
  bool maximize, unscale;
};
struct LarsArgs {
  double scale, lr, momentum, dampening, weight_decay;
  bool nesterov, first_step, maximize, update_norm, unscale;
};

namespace base {
#include "fastcnn/optim_math.h"
#include "fastcnn/optim_cpu_loops.h"
}  // namespace base

#if FASTCNN_OPTIM_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace avx2 {
#include "fastcnn/optim_math.h"
#include "fastcnn/optim_cpu_loops.h"
#include "fastcnn/optim_cpu_simd.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t kSpan = 16384;  // elements per parallel work item

using SpanFn = void (*)(void* const*, int64_t, int64_t, const void*, double, double);
using NormFn = void (*)(void* const*, int64_t, int64_t, const void*, double*);

// AVX2 + F16C present, and not turned off with ATEN_CPU_CAPABILITY=default (which also selects this file's baseline
// loops, e.g. to test them).
bool use_avx2() {
#if FASTCNN_OPTIM_AVX2
  static const bool ok = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

template <bool B>
using Bool = std::integral_constant<bool, B>;

template <typename F>
auto with_bool(bool b, F&& f) {
  return b ? f(Bool<true>{}) : f(Bool<false>{});
}

template <typename F>
auto with_mode(int m, F&& f) {  // m in {0, 1, 2}
  switch (m) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return f(std::integral_constant<int, 2>{});
  }
}

#if FASTCNN_OPTIM_AVX2
#define FASTCNN_PICK(fn, ...) (use_avx2() ? &avx2::fn<__VA_ARGS__> : &base::fn<__VA_ARGS__>)
#else
#define FASTCNN_PICK(fn, ...) (&base::fn<__VA_ARGS__>)
#endif

// One tensor's share of the call: its loop, its data pointers and its per-tensor scalars.
struct Job {
  SpanFn fn = nullptr;
  void* ptr[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  int64_t numel = 0;
  double s0 = 0, s1 = 0;
};

struct Span {
  int64_t job, begin, end;
};

std::vector<Span> spans_of(const std::vector<Job>& jobs) {
  std::vector<Span> spans;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    for (int64_t b = 0; b < jobs[j].numel; b += kSpan) spans.push_back({j, b, std::min(jobs[j].numel, b + kSpan)});
  }
  return spans;
}

// Spans are split across torch's intra-op threads (setup.py compiles with -fopenmp, which at::parallel_for needs).
template <typename F>
void parallel_items(int64_t n, const F& f) {
  at::parallel_for(0, n, grain_for(kSpan), f);
}

void run_jobs(const std::vector<Job>& jobs, const void* args) {
  const std::vector<Span> spans = spans_of(jobs);
  parallel_items(static_cast<int64_t>(spans.size()), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Job& job = jobs[spans[k].job];
      job.fn(job.ptr, spans[k].begin, spans[k].end, args, job.s0, job.s1);
    }
  });
}

bool skipped(const c10::optional<at::Tensor>& found_inf) {
  return optim::has(found_inf) && found_inf->item<float>() != 0.0f;
}

double lr_of(double lr, const c10::optional<at::Tensor>& lr_tensor) {
  return optim::has(lr_tensor) ? static_cast<double>(lr_tensor->item<float>()) : lr;
}

double scale_of(const c10::optional<at::Tensor>& grad_scale) {
  return optim::has(grad_scale) ? static_cast<double>(grad_scale->item<float>()) : 1.0;
}

// steps[i] += 1 in the step's own dtype; returns the new value (the t the update uses).
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) {
    double* s = step.mutable_data_ptr<double>();
    *s = *s + 1.0;
    return *s;
  }
  float* s = step.mutable_data_ptr<float>();
  *s = *s + 1.0f;
  return static_cast<double>(*s);
}

// One Job per parameter: the loop `pick(P*, S*)` returns for its param and state dtypes (null pointers that carry the
// types), the data pointers of its params, grads and used state lists (in the loop's order; an unused list, e.g.
// max_exp_avg_sqs without amsgrad, gives null pointers) and its element count.
template <typename Pick>
std::vector<Job> make_jobs(const optim::Call& call, const Pick& pick) {
  TORCH_INTERNAL_ASSERT(2 + call.states.size() <= std::size(Job{}.ptr), "fastcnn: a Job holds at most 5 tensor lists");
  std::vector<Job> jobs(call.params.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& job = jobs[i];
    job.fn = optim::with_dtypes(call.params[i].scalar_type(), optim::state_dtype(call.params[i], call.states, i),
                                [&](auto* pt, auto* st) -> SpanFn { return pick(pt, st); });
    job.ptr[0] = call.params[i].data_ptr();
    job.ptr[1] = call.grads[i].data_ptr();
    for (size_t k = 0; k < call.states.size(); ++k) {
      job.ptr[2 + k] = call.states[k].used ? call.states[k].tensors[i].data_ptr() : nullptr;
    }
    job.numel = call.params[i].numel();
  }
  return jobs;
}

// The kernels behind the ops' entry points (optim.h: schema arguments and checks).
struct CpuKernels {
  static void adam(const optim::Call& call, const optim::AdamHyper& h) {
    if (skipped(call.found_inf)) return;
    const int wd_mode = h.weight_decay == 0 ? 0 : (h.decoupled_weight_decay ? 2 : 1);
    const AdamArgs args{scale_of(call.grad_scale), lr_of(h.lr, call.lr_tensor), h.beta1, h.beta2, h.weight_decay,
                        h.eps, wd_mode, h.maximize, optim::has(call.grad_scale)};
    std::vector<Job> jobs = make_jobs(call, [&](auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      using S = std::remove_pointer_t<decltype(st)>;
      return with_bool(h.amsgrad,
                       [&](auto ams) -> SpanFn { return FASTCNN_PICK(adam_span, P, S, decltype(ams)::value); });
    });
    for (size_t i = 0; i < jobs.size(); ++i) {
      base::adam_bias_corrections(args.lr, h.beta1, h.beta2, increment_step(call.steps[i]), jobs[i].s0, jobs[i].s1);
    }
    run_jobs(jobs, &args);
  }

  static void sgd(const optim::Call& call, const optim::SgdHyper& h) {
    if (skipped(call.found_inf)) return;
    const SgdArgs args{scale_of(call.grad_scale), lr_of(h.lr, call.lr_tensor), h.momentum, h.dampening,
                       h.weight_decay, h.nesterov, h.first_step, h.maximize, optim::has(call.grad_scale)};
    run_jobs(make_jobs(call,
                       [&](auto* pt, auto* st) {
                         using P = std::remove_pointer_t<decltype(pt)>;
                         using S = std::remove_pointer_t<decltype(st)>;
                         return with_bool(h.momentum != 0, [&](auto mom) -> SpanFn {
                           return FASTCNN_PICK(sgd_span, P, S, decltype(mom)::value);
                         });
                       }),
             &args);
  }

  static void adagrad(const optim::Call& call, const optim::AdagradHyper& h) {
    if (skipped(call.found_inf)) return;
    const AdagradArgs args{scale_of(call.grad_scale), h.weight_decay, h.eps, h.maximize, optim::has(call.grad_scale)};
    const double lr_value = lr_of(h.lr, call.lr_tensor);
    std::vector<Job> jobs = make_jobs(call, [&](auto* pt, auto* st) {
      return FASTCNN_PICK(adagrad_span, std::remove_pointer_t<decltype(pt)>, std::remove_pointer_t<decltype(st)>);
    });
    for (size_t i = 0; i < jobs.size(); ++i) {
      jobs[i].s0 = base::adagrad_clr(lr_value, h.lr_decay, increment_step(call.steps[i]));
    }
    run_jobs(jobs, &args);
  }

  static void lars(const optim::Call& call, const optim::LarsHyper& h) {
    if (skipped(call.found_inf)) return;
    const int mode = h.lr_in_momentum ? 2 : (h.momentum != 0 ? 1 : 0);
    const LarsArgs args{scale_of(call.grad_scale), lr_of(h.lr, call.lr_tensor), h.momentum, h.dampening,
                        h.weight_decay, h.nesterov, h.first_step, h.maximize, h.update_norm,
                        optim::has(call.grad_scale)};
    std::vector<NormFn> norm_fns;
    std::vector<Job> jobs = make_jobs(call, [&](auto* pt, auto* st) {
      using P = std::remove_pointer_t<decltype(pt)>;
      using S = std::remove_pointer_t<decltype(st)>;
      norm_fns.push_back(FASTCNN_PICK(lars_norm_span, P));
      return with_mode(mode, [&](auto mom) -> SpanFn { return FASTCNN_PICK(lars_span, P, S, decltype(mom)::value); });
    });
    // Pass 1: per-span sums of squares, then per tensor in span order.
    const std::vector<Span> spans = spans_of(jobs);
    std::vector<double> partial(2 * spans.size());
    parallel_items(static_cast<int64_t>(spans.size()), [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const Job& job = jobs[spans[k].job];
        norm_fns[spans[k].job](job.ptr, spans[k].begin, spans[k].end, &args, &partial[2 * k]);
      }
    });
    std::vector<double> sums(2 * jobs.size(), 0.0);
    for (size_t k = 0; k < spans.size(); ++k) {
      sums[2 * spans[k].job] += partial[2 * k];
      sums[2 * spans[k].job + 1] += partial[2 * k + 1];
    }
    for (size_t i = 0; i < jobs.size(); ++i) {
      const double w = std::sqrt(sums[2 * i]), g = std::sqrt(sums[2 * i + 1]);
      if (call.params[i].scalar_type() == at::kDouble) {
        jobs[i].s0 = base::lars_trust_ratio<double>(w, g, h.trust_coefficient, h.weight_decay, h.eps, args.lr,
                                                    h.update_norm, h.trust_clip);
      } else {
        jobs[i].s0 = base::lars_trust_ratio<float>(float(w), float(g), float(h.trust_coefficient),
                                                   float(h.weight_decay), float(h.eps), float(args.lr),
                                                   h.update_norm, h.trust_clip);
      }
    }
    // Pass 2: the update.
    run_jobs(jobs, &args);
  }
};

}  // namespace
}  // namespace optim_cpu
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) { fastcnn::optim::register_ops<fastcnn::optim_cpu::CpuKernels>(m); }
