// Pieces shared by the CPU kernels (csrc/cpu/): the AVX2 clone attribute, branch-free selects that keep loops
// vectorisable, and the parallel grain every kernel uses so that small tensors do not fan out.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastcnn {

// Hot loops are compiled twice, for the baseline ISA and for AVX2 (twice the vector width), and the loader picks the
// clone the CPU runs. Both do the same operations in the same order (AVX2 without FMA, no reassociation), so results
// are bitwise the same on every CPU. A clone is reached through an indirect call, so put it on a function that does
// a whole row or plane of work, not on a per-element helper.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCNN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTCNN_VECTOR_CLONES
#endif

// Elements of work (about one memory-bound element each) a parallel task must have before a kernel fans out. Waking
// the other threads costs a few microseconds on an idle machine but up to a scheduler time slice (milliseconds) on a
// busy one, where a descheduled thread holds everyone at the barrier; below this size one thread does it all.
// Stock ATen's elementwise kernels use 32768 (at::internal::GRAIN_SIZE); the fused epilogues do a few operations
// per element, so they take twice that.
constexpr int64_t kMinTaskElements = 65536;

// The grain (items per task) for items of `work_per_item` elements each.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, work_per_item));
}

template <size_t kBytes>
using bits_of_size = std::conditional_t<kBytes == 8, uint64_t, std::conditional_t<kBytes == 4, uint32_t, uint16_t>>;

// v where keep, else +0, chosen on v's bits (an AND with all-ones or zero) rather than with `keep ? v : 0`: the
// compiler does not turn a conditional floating-point load into a select (the load might trap), so a `?:` there
// keeps a loop from vectorising.
template <typename scalar_t>
inline scalar_t keep_if(scalar_t v, bool keep) {
  using bits_t = bits_of_size<sizeof(scalar_t)>;
  bits_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= -static_cast<bits_t>(keep);
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}

// a where `take` is all ones, else b (take: 0 or all ones, as wide as acc_t): a select the vectoriser keeps in one
// lane width, where `?:` on a mask of another width would split the loop or leave it scalar.
template <typename acc_t, typename bits_t>
inline acc_t blend(bits_t take, acc_t a, acc_t b) {
  bits_t x, y;
  std::memcpy(&x, &a, sizeof(x));
  std::memcpy(&y, &b, sizeof(y));
  x = (x & take) | (y & ~take);
  std::memcpy(&a, &x, sizeof(x));
  return a;
}

}  // namespace fastcnn
