// Pooling-window arithmetic shared by the CPU and CUDA epilogue kernels of fastcnn::bias_relu_pool.
//
// The pool has no padding and floor mode: pooled index q along an axis covers conv positions
// [q*s, q*s + k - 1], and there are (size - k) / s + 1 of them. The compact code per pooled element is
// documented in fastcnn/reference/conv_relu_pool.py (max: row-major offset of the selected element;
// avg: bit field of the positions whose ReLU passes the gradient).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace fastcnn {

enum class PoolMode : int { None = 0, Max = 1, Avg = 2 };

inline PoolMode parse_pool(c10::string_view pool) {
  if (pool == "none") return PoolMode::None;
  if (pool == "max") return PoolMode::Max;
  if (pool == "avg") return PoolMode::Avg;
  TORCH_CHECK(false, "fastcnn: pool must be 'none', 'max' or 'avg', got '", std::string(pool), "'");
}

struct PoolWindow {
  int64_t kh, kw, sh, sw;
  C10_HOST_DEVICE int64_t area() const { return kh * kw; }
};

// Pooled windows along one axis that contain conv position p: first..last inclusive (empty when first > last).
// A window q contains p iff q*s <= p <= q*s + k - 1, i.e. ceil((p - k + 1) / s) <= q <= floor(p / s).
C10_HOST_DEVICE inline void windows_containing(int64_t p, int64_t k, int64_t s, int64_t pooled,
                                               int64_t& first, int64_t& last) {
  first = p >= k ? (p - k + s) / s : 0;
  last = p / s < pooled - 1 ? p / s : pooled - 1;
}

// PyTorch's max-pool rule, scanning the window row-major: replace the running maximum when v > best or v is
// NaN, so the first of equal maxima wins and the last NaN wins.
// Branch-free, so that loops over many windows vectorise.
template <typename acc_t>
C10_HOST_DEVICE inline void max_update(acc_t v, uint8_t offset, acc_t& best, uint8_t& code) {
  const bool take = v > best || v != v;
  best = take ? v : best;
  code = take ? offset : code;
}

// PyTorch's ReLU backward passes the gradient where the ReLU output is not <= 0 (NaN included).
template <typename acc_t>
C10_HOST_DEVICE inline bool relu_passes(acc_t v) {
  return !(v <= acc_t(0));
}

}  // namespace fastcnn
