// CPU loops of the fused optimizers: each updates the elements [begin, end) of one tensor, in vector lanes where the
// instruction set has them (Lanes<T>, specialised by optim_cpu_simd.h) and one element at a time for the tail.
//
// Like optim_math.h this header has NO include guard and no includes: cpu/optim.cpp includes it (after optim_math.h)
// once per instruction set, inside that set's namespace and target pragma. It uses the argument structs declared by
// cpu/optim.cpp in the enclosing namespace (AdamArgs, SgdArgs, AdagradArgs, LarsArgs).

// The vector lane type for opmath type T, and its width; the baseline build computes one element at a time.
template <typename T>
struct Lanes {
  using type = T;
};
template <typename V>
struct LaneCount {
  static constexpr int value = 1;
};

// Sum of squares in float64, in a fixed order (the lane layout and the element order, never the thread count).
template <typename V>
struct SquareSum {
  double s = 0;
  FASTCNN_OPTIM_HD void add(V x) { s += static_cast<double>(x) * static_cast<double>(x); }
  FASTCNN_OPTIM_HD double total() const { return s; }
};

// One element of a tensor of dtype X in opmath, and back (rounded to nearest even, as torch's copy_).
template <typename V, typename X>
FASTCNN_OPTIM_HD V load_lanes(const X* p, V*) {
  return static_cast<V>(*p);
}
template <typename X, typename V>
FASTCNN_OPTIM_HD void store_lanes(X* p, V x) {
  *p = static_cast<X>(x);
}

// Calls f(i, (L*)nullptr) for i = begin, begin + width(L), ...: L the lane type while a whole vector fits, then the
// scalar opmath type T for the tail.
template <typename T, typename F>
FASTCNN_OPTIM_HD void for_lanes(int64_t begin, int64_t end, F&& f) {
  using V = typename Lanes<T>::type;
  constexpr int kWidth = LaneCount<V>::value;
  int64_t i = begin;
  if (kWidth > 1) {
    for (; i + kWidth <= end; i += kWidth) f(i, static_cast<V*>(nullptr));
  }
  for (; i < end; ++i) f(i, static_cast<T*>(nullptr));
}

// The coefficients for lane type L: the scalar set c for the tail, the broadcast set cv for vectors.
template <typename L, typename C, typename CV>
FASTCNN_OPTIM_HD const auto& coeffs_for(const C& c, const CV& cv) {
  if constexpr (LaneCount<L>::value == 1) {
    return c;
  } else {
    return cv;
  }
}

// ptr = {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq}; s0 = step_size, s1 = sqrt(bias_correction2).
template <typename P, typename S, bool AMS>
void adam_span(void* const* ptr, int64_t begin, int64_t end, const void* args, double s0, double s1) {
  using T = at::opmath_type<P>;
  using V = typename Lanes<T>::type;
  const auto& a = *static_cast<const AdamArgs*>(args);
  const AdamCoeffs<T> c = make_adam_coeffs<T>(a.scale, a.lr, a.beta1, a.beta2, a.weight_decay, a.eps, s0, s1);
  const AdamCoeffs<V> cv = lanes_of<V>(c);
  P* const p = static_cast<P*>(ptr[0]);
  P* const g = static_cast<P*>(ptr[1]);
  S* const m = static_cast<S*>(ptr[2]);
  S* const v = static_cast<S*>(ptr[3]);
  S* const vmax = static_cast<S*>(ptr[4]);
  const bool maximize = a.maximize, unscale = a.unscale;
  const int wd_mode = a.wd_mode;
  for_lanes<T>(begin, end, [&](int64_t i, auto* tag) {
    using L = std::remove_pointer_t<decltype(tag)>;
    L pi = load_lanes(p + i, tag), gi = load_lanes(g + i, tag), mi = load_lanes(m + i, tag),
      vi = load_lanes(v + i, tag), xi = AMS ? load_lanes(vmax + i, tag) : L(T(0));
    adam_update(pi, gi, mi, vi, xi, wd_mode, AMS, unscale, maximize, coeffs_for<L>(c, cv));
    store_lanes(p + i, pi);
    if (unscale) store_lanes(g + i, gi);
    store_lanes(m + i, mi);
    store_lanes(v + i, vi);
    if (AMS) store_lanes(vmax + i, xi);
  });
}

// ptr = {param, grad, momentum_buffer}.
template <typename P, typename S, bool MOM>
void sgd_span(void* const* ptr, int64_t begin, int64_t end, const void* args, double, double) {
  using T = at::opmath_type<P>;
  using V = typename Lanes<T>::type;
  const auto& a = *static_cast<const SgdArgs*>(args);
  const SgdCoeffs<T> c = make_sgd_coeffs<T>(a.scale, a.lr, a.momentum, a.dampening, a.weight_decay);
  const SgdCoeffs<V> cv = lanes_of<V>(c);
  P* const p = static_cast<P*>(ptr[0]);
  P* const g = static_cast<P*>(ptr[1]);
  S* const b = static_cast<S*>(ptr[2]);
  const bool nesterov = a.nesterov, first = a.first_step, maximize = a.maximize, unscale = a.unscale;
  const bool has_wd = a.weight_decay != 0;
  for_lanes<T>(begin, end, [&](int64_t i, auto* tag) {
    using L = std::remove_pointer_t<decltype(tag)>;
    L pi = load_lanes(p + i, tag), gi = load_lanes(g + i, tag);
    L bi = MOM && !first ? load_lanes(b + i, tag) : L(T(0));
    sgd_update(pi, gi, bi, has_wd, MOM, nesterov, first, unscale, maximize, coeffs_for<L>(c, cv));
    store_lanes(p + i, pi);
    if (unscale) store_lanes(g + i, gi);
    if (MOM) store_lanes(b + i, bi);
  });
}

// ptr = {param, grad, state_sum}; s0 = clr.
template <typename P, typename S>
void adagrad_span(void* const* ptr, int64_t begin, int64_t end, const void* args, double s0, double) {
  using T = at::opmath_type<P>;
  using V = typename Lanes<T>::type;
  const auto& a = *static_cast<const AdagradArgs*>(args);
  const AdagradCoeffs<T> c = make_adagrad_coeffs<T>(a.scale, a.weight_decay, s0, a.eps);
  const AdagradCoeffs<V> cv = lanes_of<V>(c);
  P* const p = static_cast<P*>(ptr[0]);
  P* const g = static_cast<P*>(ptr[1]);
  S* const s = static_cast<S*>(ptr[2]);
  const bool maximize = a.maximize, unscale = a.unscale, has_wd = a.weight_decay != 0;
  for_lanes<T>(begin, end, [&](int64_t i, auto* tag) {
    using L = std::remove_pointer_t<decltype(tag)>;
    L pi = load_lanes(p + i, tag), gi = load_lanes(g + i, tag), si = load_lanes(s + i, tag);
    adagrad_update(pi, gi, si, has_wd, unscale, maximize, coeffs_for<L>(c, cv));
    store_lanes(p + i, pi);
    if (unscale) store_lanes(g + i, gi);
    store_lanes(s + i, si);
  });
}

// ptr = {param, grad, momentum_buffer}; s0 = the tensor's trust ratio. MOM: 0 plain, 1 momentum, 2 lr_in_momentum.
template <typename P, typename S, int MOM>
void lars_span(void* const* ptr, int64_t begin, int64_t end, const void* args, double s0, double) {
  using T = at::opmath_type<P>;
  using V = typename Lanes<T>::type;
  const auto& a = *static_cast<const LarsArgs*>(args);
  const LarsCoeffs<T> c = make_lars_coeffs<T>(a.scale, a.lr, a.momentum, a.dampening, a.weight_decay, s0);
  const LarsCoeffs<V> cv = lanes_of<V>(c);
  P* const p = static_cast<P*>(ptr[0]);
  P* const g = static_cast<P*>(ptr[1]);
  S* const b = static_cast<S*>(ptr[2]);
  const bool nesterov = a.nesterov, first = a.first_step, maximize = a.maximize, unscale = a.unscale;
  for_lanes<T>(begin, end, [&](int64_t i, auto* tag) {
    using L = std::remove_pointer_t<decltype(tag)>;
    L pi = load_lanes(p + i, tag), gi = load_lanes(g + i, tag);
    L bi = MOM != 0 && !first ? load_lanes(b + i, tag) : L(T(0));
    lars_update(pi, gi, bi, MOM == 1, MOM == 2, nesterov, first, unscale, maximize, coeffs_for<L>(c, cv));
    store_lanes(p + i, pi);
    if (unscale) store_lanes(g + i, gi);
    if (MOM != 0) store_lanes(b + i, bi);
  });
}

// LARS's first pass over [begin, end): out[0] = sum of p^2, out[1] = sum of the gradient term^2 (lars_norm_term).
template <typename P>
void lars_norm_span(void* const* ptr, int64_t begin, int64_t end, const void* args, double* out) {
  using T = at::opmath_type<P>;
  using V = typename Lanes<T>::type;
  const auto& a = *static_cast<const LarsArgs*>(args);
  const T scale = T(a.scale), wd = T(a.weight_decay);
  const V scale_v = V(scale), wd_v = V(wd);
  const P* const p = static_cast<const P*>(ptr[0]);
  const P* const g = static_cast<const P*>(ptr[1]);
  const bool update_norm = a.update_norm, unscale = a.unscale, maximize = a.maximize;
  SquareSum<V> wv, gv;
  SquareSum<T> ws, gs;
  for_lanes<T>(begin, end, [&](int64_t i, auto* tag) {
    using L = std::remove_pointer_t<decltype(tag)>;
    const L pi = load_lanes(p + i, tag);
    const L u = lars_norm_term(pi, load_lanes(g + i, tag), update_norm, unscale, maximize,
                               coeffs_for<L>(scale, scale_v), coeffs_for<L>(wd, wd_v));
    if constexpr (LaneCount<L>::value == 1) {
      ws.add(pi);
      gs.add(u);
    } else {
      wv.add(pi);
      gv.add(u);
    }
  });
  out[0] = wv.total() + ws.total();
  out[1] = gv.total() + gs.total();
}
