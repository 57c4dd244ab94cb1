// Multi-tensor apply for the fused optimizers (cuda/optim.cu): a device-resident work table, so one launch covers any
// number of tensors (no kernel-parameter limit as in torch's MultiTensorApply, which splits launches at 4/32 KB).
//
// Table (int64 words, on the device):
//   records: per tensor, `stride` = depth + 5 words: the depth list pointers (param, grad, states...), then the step
//            pointer (0 if none), numel, the index of its first work item, its number of chunks, and an "aligned"
//            flag (every pointer allows the ILP-wide vector access);
//   items:   per (tensor, chunk) work item, (tensor << 32) | chunk, tensor-major: tensor t's chunks are the items
//            [first_item(t), first_item(t) + chunks(t)), which LARS uses to index its per-chunk partial sums.
// Empty tensors get one empty item, so that their steps still advance. Beside the table, one uint64 counter per
// tensor counts the chunks that have read its step (see claim_step in cuda/optim.cu); counters only ever grow.
//
// Tables are cached by value: the key is the op, the device, the dtype sizes and every pointer, step pointer and
// numel, so a hit is exact whatever freed or reallocated memory in between. A table is uploaded once (pinned buffer +
// async copy on the current stream): steady-state steps do no host-to-device copy and no host sync, and a CUDA graph
// captured after a warm-up step just reads the cached table. A table first built inside a capture is uploaded by a
// captured copy (replayed by the graph from its pinned buffer, which the table keeps): it is used only by captures
// and kept alive for the process lifetime, as is every table a capture used (graphs hold its address). Other tables
// are dropped when the cache outgrows kMaxTables, outside captures only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace fastcnn {
namespace mta {

constexpr int kBlock = 256;         // threads per block
constexpr int64_t kChunk = 32768;   // elements per work item (a multiple of every ILP)
constexpr size_t kMaxTables = 64;   // cached tables kept (beyond those used by CUDA graphs)

// Elements per thread per vector access: 16 bytes of a 2-byte param dtype, else 4 (16 bytes of float32, two 16-byte
// accesses of float64); float32 state beside a 2-byte param then takes two 16-byte accesses.
template <typename P>
constexpr int ilp_for() {
  return sizeof(P) == 2 ? 8 : 4;
}

// Word offsets after the depth pointers of a record.
constexpr int kStepPtr = 0, kNumel = 1, kFirstItem = 2, kNumChunks = 3, kAligned = 4, kExtraWords = 5;

// What a kernel gets: pointers into the device table.
struct View {
  const int64_t* records;
  const int64_t* items;
  unsigned long long* counters;
  int64_t num_items;
  int stride;
};

struct Table {
  at::Tensor host;      // pinned copy (the source of the upload; kept while the table lives)
  at::Tensor device;    // records, then items
  at::Tensor counters;  // int64 storage used as uint64
  int64_t num_tensors = 0, num_items = 0;
  int stride = 0;
  bool capture_only = false;     // uploaded by a captured copy: valid only inside graphs
  bool used_in_capture = false;  // a graph reads it: never freed

  View view() const {
    const int64_t* words = device.const_data_ptr<int64_t>();
    return View{words, words + num_tensors * stride,
                reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>()), num_items, stride};
  }
};

// lists[i][t]: tensor t of list i (list 0 the params); elem_size[i]: its element size; steps: one per tensor or
// empty; op: distinguishes the ops' tables (their counters must not be shared).
inline std::shared_ptr<Table> get_table(int op, const std::vector<std::vector<at::Tensor>>& lists,
                                        const std::vector<int64_t>& elem_size, const std::vector<at::Tensor>& steps,
                                        int ilp) {
  const int depth = static_cast<int>(lists.size());
  const int64_t n = static_cast<int64_t>(lists[0].size());
  TORCH_CHECK(n < (int64_t(1) << 31), "fastcnn: too many tensors for one optimizer call (", n, ")");
  std::vector<int64_t> key = {op, lists[0][0].device().index(), depth, ilp, n};
  key.insert(key.end(), elem_size.begin(), elem_size.end());
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < depth; ++i) key.push_back(reinterpret_cast<int64_t>(lists[i][t].data_ptr()));
    key.push_back(steps.empty() ? 0 : reinterpret_cast<int64_t>(steps[t].data_ptr()));
    key.push_back(lists[0][t].numel());
  }

  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::shared_ptr<Table>> cache;
  static std::vector<std::shared_ptr<Table>> kept;  // tables a graph may read, no longer in the cache
  // (the op holds CUDA tensors, so the device has a context: the MayInitCtx variant creates none here)
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) {
    const std::shared_ptr<Table>& hit = it->second;
    if (capturing || !hit->capture_only) {
      hit->used_in_capture = hit->used_in_capture || capturing;
      return hit;
    }
    kept.push_back(hit);  // filled only when its graph replays: eager calls need their own
    cache.erase(it);
  }

  auto table = std::make_shared<Table>();
  table->num_tensors = n;
  table->stride = depth + kExtraWords;
  int64_t items = 0;
  std::vector<int64_t> chunks(n);
  for (int64_t t = 0; t < n; ++t) {
    chunks[t] = std::max<int64_t>(1, (lists[0][t].numel() + kChunk - 1) / kChunk);
    items += chunks[t];
  }
  TORCH_CHECK(items < (int64_t(1) << 40), "fastcnn: too many chunks for one optimizer call");
  table->num_items = items;
  const int64_t words = n * table->stride + items;
  table->host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* w = table->host.mutable_data_ptr<int64_t>();
  int64_t* item = w + n * table->stride;
  int64_t first = 0;
  for (int64_t t = 0; t < n; ++t) {
    int64_t* rec = w + t * table->stride;
    bool aligned = true;
    for (int i = 0; i < depth; ++i) {
      rec[i] = reinterpret_cast<int64_t>(lists[i][t].data_ptr());
      const int64_t align = std::min<int64_t>(16, ilp * elem_size[i]);
      aligned = aligned && rec[i] % align == 0;
    }
    rec[depth + kStepPtr] = steps.empty() ? 0 : reinterpret_cast<int64_t>(steps[t].data_ptr());
    rec[depth + kNumel] = lists[0][t].numel();
    rec[depth + kFirstItem] = first;
    rec[depth + kNumChunks] = chunks[t];
    rec[depth + kAligned] = aligned ? 1 : 0;
    for (int64_t c = 0; c < chunks[t]; ++c) *item++ = (t << 32) | c;
    first += chunks[t];
  }
  const at::Device device = lists[0][0].device();
  table->device = at::empty({words}, at::TensorOptions().dtype(at::kLong).device(device));
  table->counters = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));
  if (capturing) {
    // A captured copy: the graph re-reads the pinned buffer at every replay, and the table keeps it.
    C10_CUDA_CHECK(cudaMemcpyAsync(table->device.mutable_data_ptr(), table->host.const_data_ptr(),
                                   words * sizeof(int64_t), cudaMemcpyHostToDevice,
                                   at::cuda::getCurrentCUDAStream()));
    table->capture_only = true;
    table->used_in_capture = true;
  } else {
    table->device.copy_(table->host, /*non_blocking=*/true);
    if (cache.size() >= kMaxTables) {
      for (auto e = cache.begin(); e != cache.end();) {
        if (e->second->used_in_capture) {
          kept.push_back(e->second);
        }
        e = cache.erase(e);
      }
    }
  }
  cache.emplace(std::move(key), table);
  return table;
}

// Blocks for a persistent grid over `items` work items: as many as fit on the device at once, at most one per item.
template <typename Kernel>
inline int grid_for(Kernel kernel, int64_t items) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, sms * std::max(per_sm, 1))));
}

// --- device side ----------------------------------------------------------------------------------------------------
// kN elements of X, aligned to min(16, kN * sizeof(X)) bytes: one or two 16-byte (or one 8-byte) accesses.
template <typename X, int kN>
struct alignas(kN * sizeof(X) >= 16 ? 16 : kN * sizeof(X)) Pack {
  X v[kN];
};

// Runs fn(e) on every element of chunk `chunk` of the tensor described by `rec` (a record of a table of depth
// rec_depth >= kDepth), where e[i] is the element of list i < kDepth in opmath T (lists 0 and 1 have dtype P, the
// others S); afterwards list i is stored back where bit i of store_mask is set. Aligned tensors go kILP elements per
// thread per access (vector loads and stores, a scalar tail), others kILP strided elements per thread with bounds
// checks. Thread j handles elements j, j + kBlock, ... (times kILP).
template <int kDepth, int kILP, typename P, typename S, typename T, typename Fn>
__device__ __forceinline__ void for_chunk(const int64_t* rec, int rec_depth, int64_t chunk, unsigned store_mask,
                                          Fn&& fn) {
  const int64_t numel = rec[rec_depth + kNumel];
  const int64_t base = chunk * kChunk;
  const int len = static_cast<int>(numel - base < kChunk ? numel - base : kChunk);  // <= 0 for an empty tensor
  P* pp[2];
  S* sp[kDepth > 2 ? kDepth - 2 : 1];
#pragma unroll
  for (int i = 0; i < kDepth; ++i) {
    if (i < 2) {
      pp[i] = reinterpret_cast<P*>(rec[i]) + base;
    } else {
      sp[i >= 2 ? i - 2 : 0] = reinterpret_cast<S*>(rec[i]) + base;
    }
  }
  T r[kDepth][kILP];
  if (rec[rec_depth + kAligned] != 0) {
    const int vectors = len > 0 ? len / kILP : 0;
    for (int v = threadIdx.x; v < vectors; v += kBlock) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (i < 2) {
          const Pack<P, kILP> x = *reinterpret_cast<const Pack<P, kILP>*>(pp[i] + v * kILP);
#pragma unroll
          for (int k = 0; k < kILP; ++k) r[i][k] = static_cast<T>(x.v[k]);
        } else {
          const Pack<S, kILP> x = *reinterpret_cast<const Pack<S, kILP>*>(sp[i >= 2 ? i - 2 : 0] + v * kILP);
#pragma unroll
          for (int k = 0; k < kILP; ++k) r[i][k] = static_cast<T>(x.v[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        T e[kDepth];
#pragma unroll
        for (int i = 0; i < kDepth; ++i) e[i] = r[i][k];
        fn(e);
#pragma unroll
        for (int i = 0; i < kDepth; ++i) r[i][k] = e[i];
      }
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (((store_mask >> i) & 1u) == 0) continue;
        if (i < 2) {
          Pack<P, kILP> x;
#pragma unroll
          for (int k = 0; k < kILP; ++k) x.v[k] = static_cast<P>(r[i][k]);
          *reinterpret_cast<Pack<P, kILP>*>(pp[i] + v * kILP) = x;
        } else {
          Pack<S, kILP> x;
#pragma unroll
          for (int k = 0; k < kILP; ++k) x.v[k] = static_cast<S>(r[i][k]);
          *reinterpret_cast<Pack<S, kILP>*>(sp[i >= 2 ? i - 2 : 0] + v * kILP) = x;
        }
      }
    }
    for (int j = vectors * kILP + threadIdx.x; j < len; j += kBlock) {
      T e[kDepth];
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        e[i] = i < 2 ? static_cast<T>(pp[i][j]) : static_cast<T>(sp[i >= 2 ? i - 2 : 0][j]);
      }
      fn(e);
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (((store_mask >> i) & 1u) == 0) continue;
        if (i < 2) {
          pp[i][j] = static_cast<P>(e[i]);
        } else {
          sp[i >= 2 ? i - 2 : 0][j] = static_cast<S>(e[i]);
        }
      }
    }
    return;
  }
  for (int j0 = 0; j0 < len; j0 += kBlock * kILP) {
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int j = j0 + threadIdx.x + k * kBlock;
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        r[i][k] = j >= len ? T(0) : (i < 2 ? static_cast<T>(pp[i][j]) : static_cast<T>(sp[i >= 2 ? i - 2 : 0][j]));
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T e[kDepth];
#pragma unroll
      for (int i = 0; i < kDepth; ++i) e[i] = r[i][k];
      fn(e);
#pragma unroll
      for (int i = 0; i < kDepth; ++i) r[i][k] = e[i];
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int j = j0 + threadIdx.x + k * kBlock;
      if (j >= len) continue;
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (((store_mask >> i) & 1u) == 0) continue;
        if (i < 2) {
          pp[i][j] = static_cast<P>(r[i][k]);
        } else {
          sp[i >= 2 ? i - 2 : 0][j] = static_cast<S>(r[i][k]);
        }
      }
    }
  }
}

// Block-wide sums of a and b in a fixed order (warp trees, then warp 0's totals in warp order): thread 0 gets them.
// Deterministic for a given kBlock; `scratch` holds 2 * kBlock / 32 doubles; every thread must call it.
__device__ __forceinline__ void block_sum2(double& a, double& b, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kBlock / 32 + warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0;
    b = 0;
    for (int k = 0; k < kBlock / 32; ++k) {
      a += scratch[k];
      b += scratch[kBlock / 32 + k];
    }
  }
  __syncthreads();
}

}  // namespace mta
}  // namespace fastcnn
