// Attention kernels: split-KV decode over dense slots + selected regions, the log-sum-exp
// merge of splits, and tiled causal attention for the dense queries of a prefill chunk.
//
// A "lane group" of kLanes = D / kVec lanes holds one key row, each lane one 16-byte vector
// (8 fp16/bf16 or 4 fp32 elements); a warp walks kKeysPerWarp keys at a time. The whole GQA
// group (G <= 8 query heads) is scored against each loaded key, so one K/V read serves all
// G heads. Softmax state (running max m, sum l, accumulator) is fp32 and online.
#include <climits>
#include <cstdint>

#include "gaze_common.cuh"
#include "gaze_dispatch.h"
#include "gaze_launch.h"

namespace gaze {
namespace launch {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kPrefillWarps = 4;  // queries per prefill block, one per warp

template <typename T, int D>
struct Shape {
  static constexpr int kVec = dev::Vec<T>::kN;
  static constexpr int kLanes = D / kVec;          // lanes per key row
  static constexpr int kKeysPerWarp = 32 / kLanes;
  static_assert(kLanes <= 32 && 32 % kLanes == 0, "head dim must fill whole lane groups");
};

template <int kVec>
struct SoftmaxState {
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][kVec];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[g][i] = 0.f;
    }
  }
};

// One key for the G heads of a query, from raw 16-byte K/V vectors of this lane; every lane of
// the warp must call it (shuffles). q_s: [G][D] fp32 query rows in shared memory.
template <typename T, int D>
__device__ __forceinline__ void attend_raw(SoftmaxState<Shape<T, D>::kVec>& st, const float* q_s, int G,
                                           const uint4& kraw, const uint4& vraw, bool has, int lig, float scale) {
  constexpr int kVec = Shape<T, D>::kVec;
  float k[kVec], v[kVec];
  dev::convert_vec<T>(kraw, k);
  dev::convert_vec<T>(vraw, v);
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= G) break;  // G is warp-uniform
    const float* qg = q_s + g * D + lig * kVec;
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) part += qg[i] * k[i];
    const float s = dev::group_sum<Shape<T, D>::kLanes>(part) * scale;
    if (has) {
      const float m_new = fmaxf(st.m[g], s);
      const float corr = dev::exp_diff(st.m[g], m_new);
      const float w = __expf(s - m_new);
      st.l[g] = st.l[g] * corr + w;
#pragma unroll
      for (int i = 0; i < kVec; ++i) st.acc[g][i] = st.acc[g][i] * corr + w * v[i];
      st.m[g] = m_new;
    }
  }
}

// Merge the lane groups of a warp (each saw different keys); afterwards every group holds the total.
template <typename T, int D>
__device__ __forceinline__ void merge_lane_groups(SoftmaxState<Shape<T, D>::kVec>& st, int G) {
  constexpr int kVec = Shape<T, D>::kVec;
#pragma unroll
  for (int off = Shape<T, D>::kLanes; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= G) break;
      const float mo = __shfl_xor_sync(0xffffffffu, st.m[g], off);
      const float lo = __shfl_xor_sync(0xffffffffu, st.l[g], off);
      const float mn = fmaxf(st.m[g], mo);
      const float c1 = dev::exp_diff(st.m[g], mn), c2 = dev::exp_diff(mo, mn);
      st.l[g] = st.l[g] * c1 + lo * c2;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float ao = __shfl_xor_sync(0xffffffffu, st.acc[g][i], off);
        st.acc[g][i] = st.acc[g][i] * c1 + ao * c2;
      }
      st.m[g] = mn;
    }
  }
}

// Node v2: slots [0, write_offset + T) hold every written token (clamped to S).
__device__ __forceinline__ int prefix_len(const Meta& m, const Dims& d) {
  const int64_t n = *m.write_offset + d.T;
  return n < 0 ? 0 : n > d.S ? d.S : int(n);
}

struct QueryInfo {
  bool in_range, is_gaze;
  bool own;  // node v2, context_attention own_image: a context query sees only its image's slots
  int64_t slot, pos, image;
};

__device__ __forceinline__ QueryInfo query_info(const Meta& m, const Dims& d, int b, int t) {
  QueryInfo q;
  q.in_range = dev::query_slot(m.write_offset, t, d.S, &q.slot);
  q.is_gaze = q.in_range && m.gaze[size_t(b) * d.T + t] && m.slot_valid[size_t(b) * d.S + q.slot];
  q.pos = q.in_range ? m.slot_pos[size_t(b) * d.S + q.slot] : LLONG_MIN;  // out of range: sees nothing
  q.own = false;
  q.image = -1;
  if (d.own_image && q.in_range && !q.is_gaze) {
    const size_t at = size_t(b) * d.S + q.slot;
    q.image = m.slot_image[at];
    q.own = m.slot_region[at] < 0 && q.image >= 0;
  }
  return q;
}

// Keys a lane group keeps in flight: all loads of a step are issued before any is used, so a
// warp has kUnroll independent (index -> K/V) load chains outstanding instead of one.
constexpr int kUnroll = 4;

// Slot of entry i (< n_dense for a gaze query) of a query's key list, or false if the entry is
// masked. Gaze query: the dense part (v1: the valid dense slots; v2: the runtime's dense_slots, -1
// padding masked), position <= p; its region part is resolved by region_entry. Dense query: v1 every
// valid slot with position <= p; v2 the written prefix [0, write_offset + T) in slot order, masked by
// validity, position and (own_image) image.
__device__ __forceinline__ bool key_slot(const AttentionArgs& a, const Dims& d, const QueryInfo& q, int b, int i,
                                         int* slot) {
  const int64_t* pos = a.meta.slot_pos + size_t(b) * d.S;
  if (a.idx.v2) {
    if (!q.is_gaze) {
      const size_t at = size_t(b) * d.S + i;
      *slot = i;
      return a.meta.slot_valid[at] && pos[i] <= q.pos && (!q.own || a.meta.slot_image[at] == q.image);
    }
    const int64_t s = a.idx.t_dense[size_t(b) * a.idx.N + i];
    if (s < 0 || s >= d.S) return false;
    *slot = int(s);
    return pos[s] <= q.pos;
  }
  *slot = q.is_gaze ? a.idx.dense_slots[size_t(b) * d.S + i] : a.idx.valid_slots[size_t(b) * d.S + i];
  return pos[*slot] <= q.pos;
}

// Entry jj (< min(count, mrt)) of region row br's slot list, or -1 (v2: a slot outside [0, S)).
__device__ __forceinline__ int region_entry(const AttentionArgs& a, const Dims& d, size_t br, int jj) {
  if (!a.idx.v2) return a.idx.region_slots[br * d.mrt + jj];
  const int64_t s = a.idx.t_region_slots[br * d.mrt + jj];
  return s >= 0 && s < d.S ? int(s) : -1;
}

// List entries whose slots one tile resolves (one per thread) before the warps load their K/V rows.
constexpr int kKeyTile = kDecodeWarps * 32;
// Fewest list entries worth a split of their own: a query whose real list is short uses fewer of
// the planned splits (the rest write empty partials).
constexpr int kMinEntriesPerSplit = 64;

// The decode kernel's shared arrays that are never live at the same time: the selected regions'
// list offsets (prologue and key loop) and the warps' partial accumulators (final reduction).
template <int D>
union DecodeShared {
  float red_acc[kDecodeWarps][kMaxGroup][D];
  int32_t sel_start[kMaxRegions + 1];
};

// Grid (splits, Hsel, B * qc): one block per split of one query's key list. The list of a gaze query
// is its dense part (n_dense entries) followed by the real slots of its selected regions (min(count,
// mrt) each, no padding): the prologue scans the regions' counts into sel_start, so the list length,
// and with it the split ranges, are the real ones, and a list entry maps to (region, offset) by a
// binary search in shared memory (no divide). Tiles of kKeyTile entries are resolved to slots by the
// whole block at once (index loads issued together, once per key rather than once per lane), then
// each lane group issues the K/V loads of kUnroll keys before using any.
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(AttentionArgs a, Dims d) {
  using Sh = Shape<T, D>;
  constexpr int kVec = Sh::kVec;
  constexpr int kThreads = kDecodeWarps * 32;
  constexpr int kStep = kDecodeWarps * Sh::kKeysPerWarp;  // keys the block covers per unrolled slice
  static_assert(kKeyTile % (kStep * kUnroll) == 0, "a tile must hold whole unrolled slices");
  __shared__ __align__(16) float q_s[kMaxGroup * D];
  __shared__ DecodeShared<D> sh;
  __shared__ int32_t slot_s[kKeyTile];
  __shared__ int32_t warp_sum[kDecodeWarps];
  __shared__ int32_t n_sel_s;  // selected regions of a gaze query
  __shared__ float red_m[kDecodeWarps][kMaxGroup], red_l[kDecodeWarps][kMaxGroup];

  // blockIdx.y: selection head hs (see select_kernel): kv_head routing serves the G query heads of
  // KV head hs with one key list; query_head routing serves query head hs alone (its own regions).
  const int split = blockIdx.x, hs = blockIdx.y, b = blockIdx.z / a.qc, qi = blockIdx.z % a.qc;
  const int h = d.per_head ? hs / d.G : hs;
  const int g0 = d.per_head ? hs % d.G : 0, ng = d.per_head ? 1 : d.G;
  const int t = a.t0 + qi;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const QueryInfo q = query_info(a.meta, d, b, t);
  if (!q.is_gaze && !a.handle_dense) return;  // block-uniform: the prefill kernel owns this query

  const T* query = static_cast<const T*>(a.query);
  for (int e = tid; e < ng * D; e += kThreads) {
    const int g = e / D, dd = e % D;
    q_s[e] = dev::to_float(query[((size_t(b) * d.Hq + h * d.G + g0 + g) * d.T + t) * D + dd]);
  }
  const size_t bhq = (size_t(b) * d.Hsel + hs) * a.qc + qi;
  const int n_dense = a.idx.v2 ? a.idx.N : a.idx.n_dense[b];
  int length = 0;
  if (q.is_gaze) {  // block-uniform: sel_start = exclusive prefix of the selected regions' real counts
    const int32_t* sel = a.sel + bhq * d.kmax;
    const int n_sel = a.n_sel[bhq];
    const int per = (n_sel + kThreads - 1) / kThreads, lo = min(n_sel, tid * per), hi = min(n_sel, lo + per);
    int mine = 0;
    for (int i = lo; i < hi; ++i) {
      const int c = min(a.idx.count(size_t(b) * d.R + sel[i]), d.mrt);
      sh.sel_start[i] = c > 0 ? c : 0;
      mine += c > 0 ? c : 0;
    }
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += n;
    }
    if (lane == 31) warp_sum[warp] = incl;
    __syncthreads();
    int run = incl - mine, total = 0;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      run += w < warp ? warp_sum[w] : 0;
      total += warp_sum[w];
    }
    for (int i = lo; i < hi; ++i) {
      const int c = sh.sel_start[i];
      sh.sel_start[i] = run;
      run += c;
    }
    if (tid == 0) {
      sh.sel_start[n_sel] = total;
      n_sel_s = n_sel;
    }
    length = n_dense + total;
  } else if (q.in_range) {
    length = a.idx.v2 ? prefix_len(a.meta, d) : a.idx.n_valid[b];
  }
  // Splits sized by the real list: at most a.splits, none with fewer than kMinEntriesPerSplit entries.
  const int used = max(1, min(a.splits, (length + kMinEntriesPerSplit - 1) / kMinEntriesPerSplit));
  const int chunk = (length + used - 1) / used;
  const int begin = min(length, split * chunk), end = min(length, begin + chunk);

  const T* kc = static_cast<const T*>(a.key_cache);
  const T* vc = static_cast<const T*>(a.value_cache);
  const size_t head_base = (size_t(b) * d.Hkv + h) * d.S;
  const int grp = lane / Sh::kLanes, lig = lane % Sh::kLanes;
  SoftmaxState<kVec> st;
  st.init();
  for (int tile = begin; tile < end; tile += kKeyTile) {  // block-uniform trip count
    __syncthreads();  // the previous tile is consumed (q_s and sel_start written before the first)
    {
      const int i = tile + tid;
      int slot = -1;
      if (i < end) {
        if (q.is_gaze && i >= n_dense) {
          const int j = i - n_dense;
          int lo = 0, hi = n_sel_s;  // sel_start[lo] <= j < sel_start[hi] (= total)
          while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (sh.sel_start[mid] <= j) lo = mid;
            else hi = mid;
          }
          slot = region_entry(a, d, size_t(b) * d.R + a.sel[bhq * d.kmax + lo], j - sh.sel_start[lo]);
        } else if (!key_slot(a, d, q, b, i, &slot)) {
          slot = -1;
        }
      }
      slot_s[tid] = slot;
    }
    __syncthreads();
    for (int base = 0; base < kKeyTile && tile + base < end; base += kStep * kUnroll) {  // block-uniform
      uint4 kraw[kUnroll], vraw[kUnroll];
      bool has[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int slot = slot_s[base + u * kStep + warp * Sh::kKeysPerWarp + grp];
        has[u] = slot >= 0;
        if (has[u]) {
          const size_t row = (head_base + slot) * D + lig * kVec;
          kraw[u] = dev::load_raw16(kc + row);
          vraw[u] = dev::load_raw16(vc + row);
        } else {
          kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) attend_raw<T, D>(st, q_s, ng, kraw[u], vraw[u], has[u], lig, a.scale);
    }
  }
  merge_lane_groups<T, D>(st, ng);
  __syncthreads();  // sel_start (aliased by red_acc) is no longer read
  if (grp == 0) {
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {  // constant indices keep the state in registers
      if (g >= ng) break;
      if (lig == 0) {
        red_m[warp][g] = st.m[g];
        red_l[warp][g] = st.l[g];
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) sh.red_acc[warp][g][lig * kVec + i] = st.acc[g][i];
    }
  }
  __syncthreads();
  for (int e = tid; e < ng * D; e += kThreads) {
    const int g = e / D, dd = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, red_m[w][g]);
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float c = dev::exp_diff(red_m[w][g], mx);
      l += red_l[w][g] * c;
      acc += sh.red_acc[w][g][dd] * c;
    }
    const int hq = h * d.G + g0 + g;
    if (a.splits == 1) {
      static_cast<T*>(a.out)[((size_t(b) * d.Hq + hq) * d.T + t) * D + dd] =
          dev::from_float<T>(l > 0.f ? acc / l : 0.f);
    } else {
      const size_t prow = ((size_t(b) * a.qc + qi) * d.Hq + hq) * a.splits + split;
      a.part_acc[prow * D + dd] = acc;
      if (dd == 0) {
        a.part_ml[prow * 2] = mx;
        a.part_ml[prow * 2 + 1] = l;
      }
    }
  }
}

// Grid (Hq, B * qc), D threads: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_kernel(AttentionArgs a, Dims d) {
  const int hq = blockIdx.x, bq = blockIdx.y, b = bq / a.qc, qi = bq % a.qc, dd = threadIdx.x;
  const size_t row0 = (size_t(bq) * d.Hq + hq) * a.splits;
  float mx = -INFINITY;
  for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, a.part_ml[(row0 + s) * 2]);
  float l = 0.f, acc = 0.f;
  for (int s = 0; s < a.splits; ++s) {
    const float c = dev::exp_diff(a.part_ml[(row0 + s) * 2], mx);
    l += a.part_ml[(row0 + s) * 2 + 1] * c;
    acc += a.part_acc[(row0 + s) * D + dd] * c;
  }
  static_cast<T*>(a.out)[((size_t(b) * d.Hq + hq) * d.T + a.t0 + qi) * D + dd] =
      dev::from_float<T>(l > 0.f ? acc / l : 0.f);
}

template <typename T>
__host__ __device__ constexpr int prefill_tile() {
  return sizeof(T) == 4 ? 16 : 32;  // keys per shared-memory tile (8 KiB per K or V tile at D=128)
}

// Grid (ceil(T / kPrefillWarps), Hkv, B). Dense queries of a chunk: each warp owns one query
// (all G heads); the block streams every valid slot of the sequence through shared memory in
// tiles (16-byte loads), and each warp masks keys at positions > its query's.
template <typename T, int D>
__global__ void __launch_bounds__(kPrefillWarps * 32) prefill_kernel(AttentionArgs a, Dims d) {
  using Sh = Shape<T, D>;
  constexpr int kVec = Sh::kVec, kTile = prefill_tile<T>(), kChunks = D / kVec;
  __shared__ __align__(16) float q_s[kPrefillWarps][kMaxGroup * D];
  __shared__ __align__(16) T k_s[kTile * D];
  __shared__ __align__(16) T v_s[kTile * D];
  __shared__ int64_t pos_s[kTile];
  __shared__ int64_t img_s[kTile];

  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = blockIdx.x * kPrefillWarps + warp;
  QueryInfo q{};
  bool active = false;
  if (t < d.T) {
    q = query_info(a.meta, d, b, t);
    active = q.in_range && !q.is_gaze;
  }
  if (active) {
    const T* query = static_cast<const T*>(a.query);
    for (int e = lane; e < d.G * D; e += 32) {
      const int g = e / D, dd = e % D;
      q_s[warp][e] = dev::to_float(query[((size_t(b) * d.Hq + h * d.G + g) * d.T + t) * D + dd]);
    }
  }
  const T* kc = static_cast<const T*>(a.key_cache);
  const T* vc = static_cast<const T*>(a.value_cache);
  const size_t head_base = (size_t(b) * d.Hkv + h) * d.S;
  // v2: the written prefix [0, write_offset + T) in slot order (invalid slots masked); v1: valid slots.
  const int n = a.idx.v2 ? prefix_len(a.meta, d) : a.idx.n_valid[b];
  const int grp = lane / Sh::kLanes, lig = lane % Sh::kLanes;
  SoftmaxState<kVec> st;
  st.init();
  for (int base = 0; base < n; base += kTile) {
    __syncthreads();  // the previous tile is consumed (and q_s written before the first)
    for (int e = tid; e < kTile * kChunks; e += blockDim.x) {
      const int j = e / kChunks, c = e % kChunks, key = base + j;
      if (key < n) {
        const int slot = a.idx.v2 ? key : a.idx.valid_slots[size_t(b) * d.S + key];
        const size_t row = (head_base + slot) * D + c * kVec;
        dev::copy16(k_s + j * D + c * kVec, kc + row);
        dev::copy16(v_s + j * D + c * kVec, vc + row);
        if (c == 0) {
          const size_t at = size_t(b) * d.S + slot;
          pos_s[j] = a.meta.slot_valid[at] ? a.meta.slot_pos[at] : LLONG_MAX;  // v1 lists only valid slots
          img_s[j] = d.own_image ? a.meta.slot_image[at] : -1;
        }
      } else if (c == 0) {
        pos_s[j] = LLONG_MAX;  // past the list: masked for every query
        img_s[j] = -1;
      }
    }
    __syncthreads();
    if (active) {  // warp-uniform
      for (int jj = 0; jj < kTile; jj += Sh::kKeysPerWarp) {
        const int j = jj + grp;
        attend_raw<T, D>(st, q_s[warp], d.G, dev::load_raw16(k_s + j * D + lig * kVec),
                         dev::load_raw16(v_s + j * D + lig * kVec),
                         pos_s[j] <= q.pos && (!q.own || img_s[j] == q.image), lig, a.scale);
      }
    }
  }
  if (!active) return;
  merge_lane_groups<T, D>(st, d.G);
  if (grp != 0) return;
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {  // constant indices keep the state in registers
    if (g >= d.G) break;
    const float inv = st.l[g] > 0.f ? 1.f / st.l[g] : 0.f;
    T* out = static_cast<T*>(a.out) + ((size_t(b) * d.Hq + h * d.G + g) * d.T + t) * D + lig * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = dev::from_float<T>(st.acc[g][i] * inv);
  }
}

}  // namespace

void decode_attention(DType dtype, const Dims& d, const AttentionArgs& a, cudaStream_t st) {
  dispatch(dtype, d.D, [&](auto tag, auto dim) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kD = decltype(dim)::value;
    GAZE_LAUNCH(dim3(a.splits, d.Hsel, d.B * a.qc), kDecodeWarps * 32, 0, st, decode_kernel<T, kD>)(a, d);
  });
}

void merge_splits(DType dtype, const Dims& d, const AttentionArgs& a, cudaStream_t st) {
  dispatch(dtype, d.D, [&](auto tag, auto dim) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kD = decltype(dim)::value;
    GAZE_LAUNCH(dim3(d.Hq, d.B * a.qc), kD, 0, st, merge_kernel<T, kD>)(a, d);
  });
}

void prefill_attention(DType dtype, const Dims& d, const AttentionArgs& a, cudaStream_t st) {
  dispatch(dtype, d.D, [&](auto tag, auto dim) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kD = decltype(dim)::value;
    const dim3 grid((d.T + kPrefillWarps - 1) / kPrefillWarps, d.Hkv, d.B);
    GAZE_LAUNCH(grid, kPrefillWarps * 32, 0, st, prefill_kernel<T, kD>)(a, d);
  });
}

}  // namespace launch
}  // namespace gaze
