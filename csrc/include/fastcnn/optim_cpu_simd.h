// AVX2 lanes for the CPU optimizer loops: 8 floats (opmath of float32/bfloat16/float16 tensors) or 4 doubles, with the
// arithmetic of optim_math.h, loads/stores converting from/to each tensor dtype, and float64 sums of squares.
//
// No include guard: cpu/optim.cpp includes it inside its avx2 namespace, between `#pragma GCC target("avx2,f16c")`
// and the pop, after optim_math.h and optim_cpu_loops.h (whose primary templates it specialises); <immintrin.h> and
// c10's BFloat16/Half come first, at global scope. FMA is deliberately not enabled: every mul and add rounds
// separately, as the oracle's tensor ops do.

struct Vf8 {
  __m256 v;
  Vf8() = default;
  Vf8(__m256 x) : v(x) {}  // NOLINT: implicit from the raw register
  explicit Vf8(float x) : v(_mm256_set1_ps(x)) {}
};
struct Vd4 {
  __m256d v;
  Vd4() = default;
  Vd4(__m256d x) : v(x) {}  // NOLINT
  explicit Vd4(double x) : v(_mm256_set1_pd(x)) {}
};

template <>
struct Lanes<float> {
  using type = Vf8;
};
template <>
struct Lanes<double> {
  using type = Vd4;
};
template <>
struct LaneCount<Vf8> {
  static constexpr int value = 8;
};
template <>
struct LaneCount<Vd4> {
  static constexpr int value = 4;
};

FASTCNN_OPTIM_HD Vf8 mul(Vf8 a, Vf8 b) { return _mm256_mul_ps(a.v, b.v); }
FASTCNN_OPTIM_HD Vf8 add(Vf8 a, Vf8 b) { return _mm256_add_ps(a.v, b.v); }
FASTCNN_OPTIM_HD Vf8 sub(Vf8 a, Vf8 b) { return _mm256_sub_ps(a.v, b.v); }
FASTCNN_OPTIM_HD Vf8 div(Vf8 a, Vf8 b) { return _mm256_div_ps(a.v, b.v); }
FASTCNN_OPTIM_HD Vf8 sqrt_(Vf8 a) { return _mm256_sqrt_ps(a.v); }
FASTCNN_OPTIM_HD Vf8 neg(Vf8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
FASTCNN_OPTIM_HD Vf8 nan_maximum(Vf8 a, Vf8 b) {  // b where a < b or b is NaN, else a (NaN when a is)
  const __m256 take_b = _mm256_or_ps(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ), _mm256_cmp_ps(b.v, b.v, _CMP_UNORD_Q));
  return _mm256_blendv_ps(a.v, b.v, take_b);
}
FASTCNN_OPTIM_HD Vd4 mul(Vd4 a, Vd4 b) { return _mm256_mul_pd(a.v, b.v); }
FASTCNN_OPTIM_HD Vd4 add(Vd4 a, Vd4 b) { return _mm256_add_pd(a.v, b.v); }
FASTCNN_OPTIM_HD Vd4 sub(Vd4 a, Vd4 b) { return _mm256_sub_pd(a.v, b.v); }
FASTCNN_OPTIM_HD Vd4 div(Vd4 a, Vd4 b) { return _mm256_div_pd(a.v, b.v); }
FASTCNN_OPTIM_HD Vd4 sqrt_(Vd4 a) { return _mm256_sqrt_pd(a.v); }
FASTCNN_OPTIM_HD Vd4 neg(Vd4 a) { return _mm256_xor_pd(a.v, _mm256_set1_pd(-0.0)); }
FASTCNN_OPTIM_HD Vd4 nan_maximum(Vd4 a, Vd4 b) {
  const __m256d take_b = _mm256_or_pd(_mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ), _mm256_cmp_pd(b.v, b.v, _CMP_UNORD_Q));
  return _mm256_blendv_pd(a.v, b.v, take_b);
}

FASTCNN_OPTIM_HD Vf8 load_lanes(const float* p, Vf8*) { return _mm256_loadu_ps(p); }
FASTCNN_OPTIM_HD Vd4 load_lanes(const double* p, Vd4*) { return _mm256_loadu_pd(p); }
FASTCNN_OPTIM_HD Vf8 load_lanes(const c10::BFloat16* p, Vf8*) {  // bf16 bits are the high half of a float's
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
FASTCNN_OPTIM_HD Vf8 load_lanes(const c10::Half* p, Vf8*) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTCNN_OPTIM_HD void store_lanes(float* p, Vf8 x) { _mm256_storeu_ps(p, x.v); }
FASTCNN_OPTIM_HD void store_lanes(double* p, Vd4 x) { _mm256_storeu_pd(p, x.v); }
// float -> bfloat16 as c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
FASTCNN_OPTIM_HD void store_lanes(c10::BFloat16* p, Vf8 x) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
FASTCNN_OPTIM_HD void store_lanes(c10::Half* p, Vf8 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}

template <>
struct SquareSum<Vf8> {
  __m256d lo, hi;
  SquareSum() : lo(_mm256_setzero_pd()), hi(_mm256_setzero_pd()) {}  // defined here, under the AVX target
  FASTCNN_OPTIM_HD void add(Vf8 x) {
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x.v));
    const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1));
    lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
    hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
  }
  FASTCNN_OPTIM_HD double total() const {
    alignas(32) double t[8];
    _mm256_store_pd(t, lo);
    _mm256_store_pd(t + 4, hi);
    double s = 0;
    for (double x : t) s += x;
    return s;
  }
};
template <>
struct SquareSum<Vd4> {
  __m256d acc;
  SquareSum() : acc(_mm256_setzero_pd()) {}
  FASTCNN_OPTIM_HD void add(Vd4 x) { acc = _mm256_add_pd(acc, _mm256_mul_pd(x.v, x.v)); }
  FASTCNN_OPTIM_HD double total() const {
    alignas(32) double t[4];
    _mm256_store_pd(t, acc);
    return ((t[0] + t[1]) + t[2]) + t[3];
  }
};
