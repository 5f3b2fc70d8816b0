// Region scoring fused with top-k selection, one block per (gaze query, KV head, sequence), or
// (issue #12, node v2, few rows) `parts` blocks per row, each over a contiguous range of regions.
//
// score[r] = max over the group's query heads g of q[g] . (desc_sum[r] / count[r]), fp32,
// for eligible regions only (count > 0 and every valid slot's position < the query's).
// Selection sorts 64-bit keys (descending score, then ascending region id) with a bitonic
// sort in shared memory: exact ties go to the lower region index, as the contract says, and
// ineligible or padding regions carry the largest key so they are never selected.
// With parts > 1 each block writes its sorted top min(cap, eligible) keys as candidates and
// select_merge_kernel ranks the union: a candidate's global rank is its rank in its own part plus,
// for every other part, the number of that part's candidates with a smaller key. Keys are distinct
// (the region id is in the low bits) and totally ordered, so the result is the single-block one
// bit for bit, whatever the part count or the scheduling.
#include <algorithm>
#include <cstdint>
#include <string>

#include "gaze_common.cuh"
#include "gaze_dispatch.h"
#include "gaze_launch.h"

namespace gaze {
namespace launch {
namespace {

constexpr uint64_t kNotEligible = ~uint64_t(0);

template <int NS>
__host__ __device__ constexpr int select_threads() {
  return NS <= 256 ? 256 : NS <= 1024 ? 512 : 1024;
}

// Ascending unsigned order of floats: larger float -> larger code. -0 is folded to +0 by the caller.
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T, int D, int NS>
__global__ void __launch_bounds__(select_threads<NS>()) select_kernel(SelectArgs a, Dims d) {
  constexpr int kThreads = select_threads<NS>();
  constexpr int kWarps = kThreads / 32;
  __shared__ __align__(16) float q_s[kMaxGroup * D];
  __shared__ uint64_t keys[NS];
  __shared__ int n_eligible;

  // blockIdx.y: the selection head hs. kv_head routing: hs is the KV head and the score is the max
  // over its G query heads; query_head: hs is a query head, its KV head hs / G, one head scored.
  // blockIdx.x = query x parts + part; this block scores regions [r0, r0 + nr), nr <= NS. Only the
  // kSelectPartRegions variant runs in parts; the others fold parts = 1 (their code and registers
  // stay those of the single-block kernel).
  const int parts = NS == kSelectPartRegions ? a.parts : 1, part = int(blockIdx.x) % parts;
  const int qi = int(blockIdx.x) / parts, hs = blockIdx.y, b = blockIdx.z;
  const int per_part = (d.R + parts - 1) / parts;
  const int r0 = part * per_part, nr = max(0, min(d.R - r0, per_part));
  const int h = d.per_head ? hs / d.G : hs;
  const int g0 = d.per_head ? hs % d.G : 0, ng = d.per_head ? 1 : d.G;
  const int t = a.t0 + qi;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const size_t bhq = (size_t(b) * d.Hsel + hs) * a.qc + qi;
  int64_t slot;
  const bool in_range = dev::query_slot(a.meta.write_offset, t, d.S, &slot);
  const bool is_gaze = in_range && a.meta.gaze[size_t(b) * d.T + t] && a.meta.slot_valid[size_t(b) * d.S + slot];
  if (!is_gaze) {  // block-uniform
    if (tid == 0) {
      if (parts > 1)
        a.cand_n[bhq * parts + part] = 0;
      else
        a.n_sel[bhq] = 0;
    }
    return;
  }
  const int64_t p = a.meta.slot_pos[size_t(b) * d.S + slot];
  const T* query = static_cast<const T*>(a.query);
  for (int e = tid; e < ng * D; e += kThreads) {
    const int g = e / D, dd = e % D;
    q_s[e] = dev::to_float(query[((size_t(b) * d.Hq + h * d.G + g0 + g) * d.T + t) * D + dd]);
  }
  for (int r = tid; r < NS; r += kThreads) keys[r] = kNotEligible;
  if (tid == 0) n_eligible = 0;
  __syncthreads();

  // Scoring: a lane group of kLanesR lanes reads one descriptor row with one 16-byte load per lane
  // (float4), so a warp scores kRegPerWarp regions per step (2 at D = 64); each lane issues the loads
  // of kRegUnroll steps before using any. Trip counts are warp-uniform (every lane shuffles), an
  // ineligible or padding region loads nothing and writes no key.
  constexpr int kLanesR = D / 4, kRegPerWarp = 32 / kLanesR;
  constexpr int kRegUnroll = kThreads >= 1024 ? 1 : 2;  // 1024 threads: at most 64 registers each
  constexpr int kWarpStride = kWarps * kRegPerWarp;
  const int sub = lane / kLanesR, lr = lane % kLanesR;
  for (int rb = warp * kRegPerWarp + sub; rb - sub < nr; rb += kWarpStride * kRegUnroll) {
    float4 dv[kRegUnroll];
    int count[kRegUnroll];
    bool ok[kRegUnroll];
#pragma unroll
    for (int u = 0; u < kRegUnroll; ++u) {
      const int r = r0 + rb + u * kWarpStride;
      ok[u] = false;
      count[u] = 0;
      dv[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (rb + u * kWarpStride < nr) {
        const size_t br = size_t(b) * d.R + r;
        count[u] = a.idx.count(br);
        ok[u] = count[u] > 0 && a.idx.last(br) < p;
        if (ok[u])
          dv[u] = *reinterpret_cast<const float4*>(a.desc + ((size_t(b) * d.Hkv + h) * d.R + r) * D + lr * 4);
      }
    }
#pragma unroll
    for (int u = 0; u < kRegUnroll; ++u) {
      float best = -INFINITY;
      for (int g = 0; g < ng; ++g) {
        const float4 qv = *reinterpret_cast<const float4*>(q_s + g * D + lr * 4);
        const float part = qv.x * dv[u].x + qv.y * dv[u].y + qv.z * dv[u].z + qv.w * dv[u].w;
        best = fmaxf(best, dev::group_sum<kLanesR>(part));
      }
      if (ok[u] && lr == 0) {
        const int rl = rb + u * kWarpStride, r = r0 + rl;
        const float score = best / float(count[u]) + 0.0f;  // + 0.0f folds -0 into +0
        keys[rl] = (uint64_t(~ordered_bits(score)) << 32) | uint32_t(r);
        atomicAdd(&n_eligible, 1);
      }
    }
  }
  __syncthreads();

  // Bitonic sort, ascending.
  for (int k = 2; k <= NS; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < NS; i += kThreads) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const uint64_t x = keys[i], y = keys[ixj];
          const bool ascending = (i & k) == 0;
          if ((x > y) == ascending) {
            keys[i] = y;
            keys[ixj] = x;
          }
        }
      }
      __syncthreads();
    }
  }
  if (parts > 1) {  // this part's candidates: its sorted top min(cap, eligible) keys
    const int n = min(a.cap, n_eligible);
    uint64_t* cand = a.cand + (bhq * parts + part) * size_t(a.cap);
    for (int i = tid; i < n; i += kThreads) cand[i] = keys[i];
    if (tid == 0) a.cand_n[bhq * parts + part] = n;
    return;
  }
  const int n = min(d.kmax, n_eligible);
  for (int i = tid; i < d.kmax; i += kThreads)
    a.sel[bhq * d.kmax + i] = i < n ? int32_t(keys[i] & 0xffffffffu) : -1;
  if (tid == 0) a.n_sel[bhq] = n;
}

// Number of the n ascending keys of `list` that are smaller than `key` (lower bound).
__device__ __forceinline__ int count_below(const uint64_t* list, int n, uint64_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (list[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

constexpr int kMergeThreads = 256;

// One block per (query, selection head, sequence): the global top-kmax of the parts' candidates.
__global__ void __launch_bounds__(kMergeThreads) select_merge_kernel(SelectArgs a, Dims d) {
  __shared__ int cnt[kMaxSelectParts], first[kMaxSelectParts + 1];
  const int qi = blockIdx.x, hs = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int parts = a.parts, cap = a.cap;
  const size_t bhq = (size_t(b) * d.Hsel + hs) * a.qc + qi;
  const uint64_t* cand = a.cand + bhq * parts * size_t(cap);
  if (tid < parts) cnt[tid] = a.cand_n[bhq * parts + tid];
  __syncthreads();
  if (tid == 0) {
    first[0] = 0;
    for (int j = 0; j < parts; ++j) first[j + 1] = first[j] + cnt[j];
  }
  __syncthreads();
  const int total = first[parts], n = min(d.kmax, total);
  int32_t* sel = a.sel + bhq * d.kmax;
  for (int i = n + tid; i < d.kmax; i += kMergeThreads) sel[i] = -1;
  for (int e = tid; e < total; e += kMergeThreads) {
    int j = 0;
    while (e >= first[j + 1]) ++j;
    const int own = e - first[j];
    const uint64_t key = cand[size_t(j) * cap + own];
    int rank = own;
    for (int o = 0; o < parts && rank < n; ++o)
      if (o != j) rank += count_below(cand + size_t(o) * cap, cnt[o], key);
    if (rank < n) sel[rank] = int32_t(key & 0xffffffffu);
  }
  if (tid == 0) a.n_sel[bhq] = n;
}

}  // namespace

void select_regions(DType dtype, const Dims& d, const SelectArgs& a, cudaStream_t st) {
  dispatch(dtype, d.D, [&](auto tag, auto dim) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kD = decltype(dim)::value;
    if (a.parts > 1) {
      if (a.cand == nullptr || a.cand_n == nullptr || a.parts > kMaxSelectParts || a.cap < 1 ||
          (d.R + a.parts - 1) / a.parts > kSelectPartRegions || a.cap < std::min(d.kmax, kSelectPartRegions))
        throw Error(Error::kInvalid, "select_regions: bad region-part plan (" + std::to_string(a.parts) + " parts)");
      const dim3 grid(a.qc * a.parts, d.Hsel, d.B);
      GAZE_LAUNCH(grid, select_threads<kSelectPartRegions>(), 0, st,
                  select_kernel<T, kD, kSelectPartRegions>)(a, d);
      GAZE_LAUNCH(dim3(a.qc, d.Hsel, d.B), kMergeThreads, 0, st, select_merge_kernel)(a, d);
      return;
    }
    const dim3 grid(a.qc, d.Hsel, d.B);
    if (d.R <= 256) {
      GAZE_LAUNCH(grid, select_threads<256>(), 0, st, select_kernel<T, kD, 256>)(a, d);
    } else if (d.R <= 1024) {
      GAZE_LAUNCH(grid, select_threads<1024>(), 0, st, select_kernel<T, kD, 1024>)(a, d);
    } else if (d.R <= kMaxRegions) {
      GAZE_LAUNCH(grid, select_threads<kMaxRegions>(), 0, st, select_kernel<T, kD, kMaxRegions>)(a, d);
    } else {
      throw Error(Error::kUnsupported, "num_regions " + std::to_string(d.R) + " exceeds " +
                                           std::to_string(kMaxRegions));
    }
  });
}

}  // namespace launch
}  // namespace gaze
