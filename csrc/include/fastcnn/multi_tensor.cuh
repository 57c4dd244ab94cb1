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
// numel, so a hit is exact whatever freed or reallocated memory in between. Eviction is least-recently-used, one table
// at a time beyond kMaxTables, so a steady step over up to kMaxTables distinct tables (param groups x dtype groups,
// or gradients that alternate between a few addresses) keeps hitting; gradients at new addresses every step still
// build (and upload) a new table each step.
//
// Upload. Outside a capture: pinned buffer + async copy on the current stream (no host sync); steady-state steps do
// no host-to-device copy. A table is allocated on the stream that built it; when another stream uses it, that stream
// first waits for the upload (an event) and the table's memory is marked as used by it (record_stream), so evicting
// the table cannot hand the memory to new work while that stream's kernels may still read it.
// Inside a CUDA-graph capture: no host allocation at all (no pinned memory). A table first built inside a capture is
// filled by kernel nodes that carry its words as kernel parameters (kFillWords per node), and every later capture
// that uses that table records the same fill nodes again, so each graph fills what it reads, whichever graphs are
// replayed (replaying only the second graph used to read a table only the first graph's copy node filled). Such a
// table is valid only inside graphs: an eager call builds its own. Tables a capture used are never freed (graphs
// hold their addresses). A table built eagerly and then used by a capture (the usual warm-up-then-capture) needs no
// fill node: torch.cuda.graph synchronises the device before capturing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace fastcnn {
namespace mta {

constexpr int kBlock = 256;         // threads per block
constexpr int64_t kChunk = 32768;   // elements per work item (a multiple of every ILP)
constexpr size_t kMaxTables = 64;   // cached tables kept (beyond those used by CUDA graphs)
constexpr int kFillWords = 480;     // table words per fill node (3,840 bytes: within the 4 KB kernel-parameter limit)

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
  at::Tensor host;              // pinned copy, the source of an eager upload (kept while the table lives)
  std::vector<int64_t> words;   // the contents, kept for the fill nodes of capture-built tables
  at::Tensor device;            // records, then items
  at::Tensor counters;          // int64 storage used as uint64
  int64_t num_tensors = 0, num_items = 0;
  int stride = 0;
  bool capture_only = false;     // filled by captured nodes: valid only inside graphs
  bool used_in_capture = false;  // a graph reads it: never freed
  cudaStream_t home = nullptr;   // the stream that allocated and uploaded it
  std::shared_ptr<at::cuda::CUDAEvent> uploaded;  // recorded on `home` after the upload
  std::vector<cudaStream_t> users;                // other streams that used it (recorded, waited)

  View view() const {
    const int64_t* words = device.const_data_ptr<int64_t>();
    return View{words, words + num_tensors * stride,
                reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>()), num_items, stride};
  }
};

struct FillWords {
  int64_t w[kFillWords];
};

// A fill node: dst[0, count) = words; the first node also zeroes the counters (every graph then starts its replays
// from zero, a multiple of every chunk count, as claim_step needs).
static __global__ void __launch_bounds__(kBlock)
    fill_table_kernel(int64_t* dst, int count, FillWords words, int64_t* counters, int64_t num_counters) {
  for (int i = threadIdx.x; i < count; i += kBlock) dst[i] = words.w[i];
  for (int64_t i = threadIdx.x; i < num_counters; i += kBlock) counters[i] = 0;
}

// Records the fill of a capture-built table into the capture on `stream`.
inline void record_fill(const Table& table, cudaStream_t stream) {
  int64_t* dst = const_cast<int64_t*>(table.device.const_data_ptr<int64_t>());
  int64_t* counters = table.counters.mutable_data_ptr<int64_t>();
  const int64_t total = static_cast<int64_t>(table.words.size());
  for (int64_t off = 0; off < total; off += kFillWords) {
    FillWords payload{};
    const int count = static_cast<int>(std::min<int64_t>(kFillWords, total - off));
    std::memcpy(payload.w, table.words.data() + off, count * sizeof(int64_t));
    fill_table_kernel<<<1, kBlock, 0, stream>>>(dst + off, count, payload, counters, off == 0 ? table.num_tensors : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// An eager table used on `stream`, not the one that uploaded it: that stream waits for the upload, and the table's
// memory is recorded as used by it (so that freeing the table after an eviction waits for that stream's work).
inline void note_user(Table& table, cudaStream_t stream) {
  if (stream == table.home || std::find(table.users.begin(), table.users.end(), stream) != table.users.end()) return;
  const at::cuda::CUDAStream s = at::cuda::getCurrentCUDAStream();
  table.uploaded->block(s);
  table.device.record_stream(s);
  table.counters.record_stream(s);
  table.users.push_back(stream);
}

// The cache: least recently used at the back.
struct Cache {
  using Key = std::vector<int64_t>;
  std::list<std::pair<Key, std::shared_ptr<Table>>> order;
  std::map<Key, decltype(order)::iterator> index;
  std::vector<std::shared_ptr<Table>> kept;  // tables a graph may read, no longer in the cache

  std::shared_ptr<Table> find(const Key& key) {
    auto it = index.find(key);
    if (it == index.end()) return nullptr;
    order.splice(order.begin(), order, it->second);  // most recently used
    return it->second->second;
  }
  void erase(const Key& key) {
    auto it = index.find(key);
    order.erase(it->second);
    index.erase(it);
  }
  void insert(Key key, std::shared_ptr<Table> table) {
    order.emplace_front(std::move(key), std::move(table));
    index.emplace(order.front().first, order.begin());
  }
  // Outside captures only: drops least recently used tables beyond kMaxTables (keeping those a graph reads).
  void evict() {
    while (order.size() > kMaxTables) {
      auto& [key, table] = order.back();
      if (table->used_in_capture) kept.push_back(table);
      index.erase(key);
      order.pop_back();
    }
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
  static Cache cache;
  // (the op holds CUDA tensors, so the device has a context: the MayInitCtx variant creates none here)
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::lock_guard<std::mutex> lock(mutex);
  if (std::shared_ptr<Table> hit = cache.find(key)) {
    if (capturing) {
      hit->used_in_capture = true;
      if (hit->capture_only) record_fill(*hit, stream);  // this graph fills what it reads
      return hit;
    }
    if (!hit->capture_only) {
      note_user(*hit, stream);
      return hit;
    }
    cache.kept.push_back(hit);  // filled only when a graph replays: eager calls need their own
    cache.erase(key);
  }

  auto table = std::make_shared<Table>();
  table->num_tensors = n;
  table->stride = depth + kExtraWords;
  table->home = stream;
  int64_t items = 0;
  std::vector<int64_t> chunks(n);
  for (int64_t t = 0; t < n; ++t) {
    chunks[t] = std::max<int64_t>(1, (lists[0][t].numel() + kChunk - 1) / kChunk);
    items += chunks[t];
  }
  TORCH_CHECK(items < (int64_t(1) << 40), "fastcnn: too many chunks for one optimizer call");
  table->num_items = items;
  const int64_t words = n * table->stride + items;
  std::vector<int64_t> host(words);
  int64_t* w = host.data();
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
  const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
  table->device = at::empty({words}, longs);
  if (capturing) {
    // From the graph's private pool; the fill nodes write the words and zero the counters at every replay.
    table->counters = at::empty({n}, longs);
    table->words = std::move(host);
    table->capture_only = true;
    table->used_in_capture = true;
    record_fill(*table, stream);
  } else {
    table->counters = at::zeros({n}, longs);
    table->host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(table->host.mutable_data_ptr<int64_t>(), host.data(), words * sizeof(int64_t));
    table->device.copy_(table->host, /*non_blocking=*/true);
    table->uploaded = std::make_shared<at::cuda::CUDAEvent>();
    table->uploaded->record(at::cuda::getCurrentCUDAStream());
  }
  cache.insert(std::move(key), table);
  if (!capturing) cache.evict();
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

// Element j of list i (lists 0 and 1 of dtype P, the others S) in opmath T, and its store back.
template <typename T, typename P, typename S>
__device__ __forceinline__ T load_elem(P* const* pp, S* const* sp, int i, int j) {
  return i < 2 ? static_cast<T>(pp[i][j]) : static_cast<T>(sp[i >= 2 ? i - 2 : 0][j]);
}
template <typename P, typename S, typename T>
__device__ __forceinline__ void store_elem(P* const* pp, S* const* sp, int i, int j, T v) {
  if (i < 2) {
    pp[i][j] = static_cast<P>(v);
  } else {
    sp[i >= 2 ? i - 2 : 0][j] = static_cast<S>(v);
  }
}

// fn(e) on each of the kILP lanes of r, e[i] = r[i][lane] (the lane's element of every list), written back.
template <int kDepth, int kILP, typename T, typename Fn>
__device__ __forceinline__ void apply_lanes(T (&r)[kDepth][kILP], Fn& fn) {
#pragma unroll
  for (int k = 0; k < kILP; ++k) {
    T e[kDepth];
#pragma unroll
    for (int i = 0; i < kDepth; ++i) e[i] = r[i][k];
    fn(e);
#pragma unroll
    for (int i = 0; i < kDepth; ++i) r[i][k] = e[i];
  }
}

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
      apply_lanes(r, fn);
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
      for (int i = 0; i < kDepth; ++i) e[i] = load_elem<T>(pp, sp, i, j);
      fn(e);
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (((store_mask >> i) & 1u) != 0) store_elem(pp, sp, i, j, e[i]);
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
        r[i][k] = j >= len ? T(0) : load_elem<T>(pp, sp, i, j);
      }
    }
    apply_lanes(r, fn);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int j = j0 + threadIdx.x + k * kBlock;
      if (j >= len) continue;
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (((store_mask >> i) & 1u) != 0) store_elem(pp, sp, i, j, r[i][k]);
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
