// The per-element update rules of the fused optimizers (fastcnn::adam_, sgd_, adagrad_, lars_), shared by the CPU
// kernels (cpu/optim.cpp) and the CUDA kernels (cuda/optim.cu), so that both round exactly as the plain-PyTorch
// oracle fastcnn/reference/optim.py does.
//
// Each rule is written once over a "lane" type V: float or double on the device and in the CPU scalar tails, an
// 8-float / 4-double AVX2 register in the CPU vector loops. The primitives mul/add/sub/div/sqrt round every operation
// separately (never contracted into an FMA: __fmul_rn & co. on the device, and no FMA in the CPU targets), so each
// rule rounds as the oracle's sequence of separate tensor ops does. Every Python scalar of the oracle reaches the
// tensor math as its value rounded to opmath (e.g. (1 - beta1) is formed in double, then rounded); the host and device
// callers build those coefficients in double and round once.
//
// This header deliberately has NO include guard and no includes: cpu/optim.cpp includes it once per instruction set,
// each time inside its own namespace, so that the avx2 copy is compiled for AVX2 (and inlines the vector lanes) while
// the baseline copy stays runnable on any x86-64. Include <cmath> (and the CUDA headers) before it.

#ifndef FASTCNN_OPTIM_HD
#if defined(__CUDACC__)
#define FASTCNN_OPTIM_HD __host__ __device__ __forceinline__
#else
#define FASTCNN_OPTIM_HD inline __attribute__((always_inline))
#endif
#endif

// --- scalar primitives, correctly rounded one operation at a time -------------------------------------------------
// On the device each is the _rn intrinsic of its precision; on the host the plain operator (the CPU targets enable no
// FMA, so nothing is contracted).
#if defined(__CUDA_ARCH__)
#define FASTCNN_ROUNDED_BINARY(name, op, float_rn, double_rn)                            \
  FASTCNN_OPTIM_HD float name(float a, float b) { return float_rn(a, b); }              \
  FASTCNN_OPTIM_HD double name(double a, double b) { return double_rn(a, b); }
#define FASTCNN_ROUNDED_SQRT                                                            \
  FASTCNN_OPTIM_HD float sqrt_(float a) { return __fsqrt_rn(a); }                       \
  FASTCNN_OPTIM_HD double sqrt_(double a) { return __dsqrt_rn(a); }
#else
#define FASTCNN_ROUNDED_BINARY(name, op, float_rn, double_rn)                            \
  FASTCNN_OPTIM_HD float name(float a, float b) { return a op b; }                      \
  FASTCNN_OPTIM_HD double name(double a, double b) { return a op b; }
#define FASTCNN_ROUNDED_SQRT                                                            \
  FASTCNN_OPTIM_HD float sqrt_(float a) { return std::sqrt(a); }                        \
  FASTCNN_OPTIM_HD double sqrt_(double a) { return std::sqrt(a); }
#endif
FASTCNN_ROUNDED_BINARY(mul, *, __fmul_rn, __dmul_rn)
FASTCNN_ROUNDED_BINARY(add, +, __fadd_rn, __dadd_rn)
FASTCNN_ROUNDED_BINARY(sub, -, __fsub_rn, __dsub_rn)
FASTCNN_ROUNDED_BINARY(div, /, __fdiv_rn, __ddiv_rn)
FASTCNN_ROUNDED_SQRT
#undef FASTCNN_ROUNDED_BINARY
#undef FASTCNN_ROUNDED_SQRT
template <typename T>
FASTCNN_OPTIM_HD T neg(T a) {
  return -a;
}
// torch.maximum: NaN when either side is NaN.
template <typename T>
FASTCNN_OPTIM_HD T nan_maximum(T a, T b) {
  return (a < b || b != b) ? b : a;
}

// --- coefficients: every scalar of a rule, already rounded to the lane type --------------------------------------
// Weight-decay modes of Adam: none, L2 (g += wd*p), decoupled (AdamW: p -= lr*wd*p first).
enum WeightDecayMode : int { kNoDecay = 0, kL2Decay = 1, kDecoupledDecay = 2 };

template <typename V>
struct AdamCoeffs {
  V scale;      // grad_scale (used only when the caller unscales)
  V wd;         // weight_decay                      (L2)
  V lr_wd;      // lr * weight_decay, formed in double (decoupled)
  V beta1, one_minus_beta1, beta2, one_minus_beta2;
  V step_size;  // lr / (1 - beta1^t), in double
  V bc2_sqrt;   // sqrt(1 - beta2^t), in double
  V eps;
};

template <typename V>
struct SgdCoeffs {
  V scale, wd, momentum, one_minus_dampening, lr;
};

template <typename V>
struct AdagradCoeffs {
  V scale, wd, clr, eps;  // clr = lr / (1 + (t - 1) * lr_decay), in double
};

template <typename V>
struct LarsCoeffs {
  V scale, wd, ratio, momentum, one_minus_dampening, lr;
};

// The gradient as the rules use it: unscaled (g then holds the value written back), negated when maximizing.
template <typename V>
FASTCNN_OPTIM_HD V unscaled_grad(V& g, bool unscale, bool maximize, V scale) {
  if (unscale) g = div(g, scale);
  return maximize ? neg(g) : g;
}

// Adam / AdamW / AMSGrad on one lane. p, g, m, v, vmax hold opmath values on entry and the new values on exit (g only
// changes when unscaling).
template <typename V>
FASTCNN_OPTIM_HD void adam_update(V& p, V& g, V& m, V& v, V& vmax, int wd_mode, bool amsgrad, bool unscale,
                                  bool maximize, const AdamCoeffs<V>& c) {
  V grad = unscaled_grad(g, unscale, maximize, c.scale);
  if (wd_mode == kL2Decay) {
    grad = add(grad, mul(c.wd, p));
  } else if (wd_mode == kDecoupledDecay) {
    p = sub(p, mul(c.lr_wd, p));
  }
  m = add(mul(c.beta1, m), mul(c.one_minus_beta1, grad));
  v = add(mul(c.beta2, v), mul(mul(c.one_minus_beta2, grad), grad));
  V denom;
  if (amsgrad) {
    vmax = nan_maximum(vmax, v);
    denom = sqrt_(vmax);
  } else {
    denom = sqrt_(v);
  }
  denom = add(div(denom, c.bc2_sqrt), c.eps);
  p = sub(p, div(mul(c.step_size, m), denom));
}

// SGD with optional momentum (b), dampening, Nesterov and L2 weight decay.
template <typename V>
FASTCNN_OPTIM_HD void sgd_update(V& p, V& g, V& b, bool has_wd, bool has_momentum, bool nesterov, bool first_step,
                                 bool unscale, bool maximize, const SgdCoeffs<V>& c) {
  V grad = unscaled_grad(g, unscale, maximize, c.scale);
  if (has_wd) grad = add(grad, mul(c.wd, p));
  if (has_momentum) {
    b = first_step ? grad : add(mul(c.momentum, b), mul(c.one_minus_dampening, grad));
    grad = nesterov ? add(grad, mul(c.momentum, b)) : b;
  }
  p = sub(p, mul(c.lr, grad));
}

// Adagrad: s += g^2; p -= clr * g / (sqrt(s) + eps).
template <typename V>
FASTCNN_OPTIM_HD void adagrad_update(V& p, V& g, V& s, bool has_wd, bool unscale, bool maximize,
                                     const AdagradCoeffs<V>& c) {
  V grad = unscaled_grad(g, unscale, maximize, c.scale);
  if (has_wd) grad = add(grad, mul(c.wd, p));
  s = add(s, mul(grad, grad));
  p = sub(p, div(mul(c.clr, grad), add(sqrt_(s), c.eps)));
}

// LARS on one lane, given the tensor's trust ratio: d = ratio * (g + wd*p) (the decay term always formed, as in the
// oracle), then SGD momentum on d, or with lr_in_momentum the learning rate inside the buffer.
template <typename V>
FASTCNN_OPTIM_HD void lars_update(V& p, V& g, V& b, bool has_momentum, bool lr_in_momentum, bool nesterov,
                                  bool first_step, bool unscale, bool maximize, const LarsCoeffs<V>& c) {
  const V grad = unscaled_grad(g, unscale, maximize, c.scale);
  V d = mul(c.ratio, add(grad, mul(c.wd, p)));
  if (lr_in_momentum) {
    const V lr_d = mul(c.lr, d);
    b = first_step ? lr_d : add(mul(c.momentum, b), lr_d);
    p = sub(p, nesterov ? add(lr_d, mul(c.momentum, b)) : b);
    return;
  }
  if (has_momentum) {
    b = first_step ? d : add(mul(c.momentum, b), mul(c.one_minus_dampening, d));
    d = nesterov ? add(d, mul(c.momentum, b)) : b;
  }
  p = sub(p, mul(c.lr, d));
}

// The value whose squares LARS sums for its gradient norm: the unscaled (maximize-negated) g, or with update_norm
// g + wd*p. p is summed as is.
template <typename V>
FASTCNN_OPTIM_HD V lars_norm_term(V p, V g, bool update_norm, bool unscale, bool maximize, V scale, V wd) {
  const V grad = unscaled_grad(g, unscale, maximize, scale);
  return update_norm ? add(grad, mul(wd, p)) : grad;
}

// --- per-tensor scalars (computed once per tensor, host or device) ------------------------------------------------
// Adam's bias corrections for step t (the incremented step), in double as the oracle forms them.
FASTCNN_OPTIM_HD void adam_bias_corrections(double lr, double beta1, double beta2, double t, double& step_size,
                                            double& bc2_sqrt) {
  step_size = lr / (1.0 - pow(beta1, t));
  bc2_sqrt = sqrt(1.0 - pow(beta2, t));
}

FASTCNN_OPTIM_HD double adagrad_clr(double lr, double lr_decay, double t) {
  return lr / (1.0 + (t - 1.0) * lr_decay);
}

// LARS's trust ratio from the norms (already rounded to T): eta*|w| / (|g| + wd*|w| + eps), or eta*|w| / (|g + wd*w|
// + eps) with update_norm; 1 unless both norms are > 0; LARC's clip min(ratio / lr, 1) (NaN kept) with trust_clip.
template <typename T>
FASTCNN_OPTIM_HD T lars_trust_ratio(T w_norm, T g_norm, T trust_coefficient, T wd, T eps, T lr, bool update_norm,
                                    bool trust_clip) {
  const T num = mul(trust_coefficient, w_norm);
  T ratio = update_norm ? div(num, add(g_norm, eps)) : div(num, add(add(g_norm, mul(wd, w_norm)), eps));
  if (!(w_norm > T(0) && g_norm > T(0))) ratio = T(1);
  if (trust_clip) {
    ratio = div(ratio, lr);
    if (ratio > T(1)) ratio = T(1);
  }
  return ratio;
}

// --- coefficients from the op's double arguments, each rounded once to the opmath type T -------------------------
template <typename T>
FASTCNN_OPTIM_HD AdamCoeffs<T> make_adam_coeffs(double scale, double lr, double beta1, double beta2, double wd,
                                                double eps, double step_size, double bc2_sqrt) {
  return AdamCoeffs<T>{T(scale), T(wd), T(lr * wd), T(beta1), T(1.0 - beta1), T(beta2), T(1.0 - beta2),
                       T(step_size), T(bc2_sqrt), T(eps)};
}

template <typename T>
FASTCNN_OPTIM_HD SgdCoeffs<T> make_sgd_coeffs(double scale, double lr, double momentum, double dampening, double wd) {
  return SgdCoeffs<T>{T(scale), T(wd), T(momentum), T(1.0 - dampening), T(lr)};
}

template <typename T>
FASTCNN_OPTIM_HD AdagradCoeffs<T> make_adagrad_coeffs(double scale, double wd, double clr, double eps) {
  return AdagradCoeffs<T>{T(scale), T(wd), T(clr), T(eps)};
}

template <typename T>
FASTCNN_OPTIM_HD LarsCoeffs<T> make_lars_coeffs(double scale, double lr, double momentum, double dampening, double wd,
                                                double ratio) {
  return LarsCoeffs<T>{T(scale), T(wd), T(ratio), T(momentum), T(1.0 - dampening), T(lr)};
}

// The same coefficients broadcast to a vector lane type (V(x) for V == T is the identity).
template <typename V, typename T>
FASTCNN_OPTIM_HD AdamCoeffs<V> lanes_of(const AdamCoeffs<T>& c) {
  return AdamCoeffs<V>{V(c.scale), V(c.wd), V(c.lr_wd), V(c.beta1), V(c.one_minus_beta1), V(c.beta2),
                       V(c.one_minus_beta2), V(c.step_size), V(c.bc2_sqrt), V(c.eps)};
}
template <typename V, typename T>
FASTCNN_OPTIM_HD SgdCoeffs<V> lanes_of(const SgdCoeffs<T>& c) {
  return SgdCoeffs<V>{V(c.scale), V(c.wd), V(c.momentum), V(c.one_minus_dampening), V(c.lr)};
}
template <typename V, typename T>
FASTCNN_OPTIM_HD AdagradCoeffs<V> lanes_of(const AdagradCoeffs<T>& c) {
  return AdagradCoeffs<V>{V(c.scale), V(c.wd), V(c.clr), V(c.eps)};
}
template <typename V, typename T>
FASTCNN_OPTIM_HD LarsCoeffs<V> lanes_of(const LarsCoeffs<T>& c) {
  return LarsCoeffs<V>{V(c.scale), V(c.wd), V(c.ratio), V(c.momentum), V(c.one_minus_dampening), V(c.lr)};
}
