// KV write + descriptor sums, and the per-call slot index the attention kernels read.
#include <climits>

#include "gaze_common.cuh"
#include "gaze_dispatch.h"
#include "gaze_launch.h"

namespace gaze {
namespace launch {
namespace {

constexpr int kIndexThreads = 256;
constexpr int kIndexWarps = kIndexThreads / 32;

// Grid (T, Hkv, B), one thread per 16-byte chunk of a row: the KV write. The descriptor sums
// are desc_sum_kernel's (deterministic, no atomics).
template <typename T, int D>
__global__ void kv_write_kernel(const T* __restrict__ key, const T* __restrict__ value, T* key_cache,
                                T* value_cache, Meta m, Dims d, int32_t* error_flags) {
  constexpr int kVec = dev::Vec<T>::kN;
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, c = threadIdx.x;
  int64_t slot;
  if (!dev::query_slot(m.write_offset, t, d.S, &slot)) {
    if (c == 0) atomicOr(error_flags, kErrWriteOffset);
    return;
  }
  const size_t src = ((size_t(b) * d.Hkv + h) * d.T + t) * D + size_t(c) * kVec;
  const size_t dst = ((size_t(b) * d.Hkv + h) * d.S + slot) * D + size_t(c) * kVec;
  dev::copy16(key_cache + dst, key + src);
  dev::copy16(value_cache + dst, value + src);
}

// Region of new token u for the descriptor update: slot_region if the slot is in range and
// valid and the region id < R, else -1 (kv_write flags a bad write_offset; the slot index or the
// runtime's tables a bad region id).
__device__ __forceinline__ int32_t new_token_region(const Meta& m, const Dims& d, int b, int u) {
  int64_t slot;
  if (!dev::query_slot(m.write_offset, u, d.S, &slot)) return -1;
  const size_t at = size_t(b) * d.S + slot;
  const int64_t r = m.slot_region[at];
  return m.slot_valid[at] && r >= 0 && r < d.R ? int32_t(r) : -1;
}

constexpr int kDescTile = 256;

// Grid (T, Hkv, B), one thread per 16-byte chunk of a row. Deterministic descriptor sums: the
// block of new token t is the leader of its region when no earlier new token of the call has
// that region; the leader sums the call's tokens of the region in slot order (fp32) and adds
// the total to the running sum once. One writer per (b, h, region): no atomics, and the same
// inputs give the same bits whatever the scheduling (prefill ties need that).
template <typename T, int D>
__global__ void desc_sum_kernel(const T* __restrict__ key, float* desc, Meta m, Dims d) {
  constexpr int kVec = dev::Vec<T>::kN;
  __shared__ int32_t region_s[kDescTile];
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, c = threadIdx.x, nt = blockDim.x;
  const int32_t r = new_token_region(m, d, b, t);  // block-uniform
  if (r < 0) return;
  bool leader = true;  // identical in every thread (read from the same shared tile)
  for (int base = 0; base < t && leader; base += kDescTile) {
    __syncthreads();  // the previous tile is consumed
    for (int u = c; u < kDescTile; u += nt) region_s[u] = base + u < t ? new_token_region(m, d, b, base + u) : -1;
    __syncthreads();
    for (int u = 0; u < kDescTile; ++u) {
      if (region_s[u] == r) {
        leader = false;
        break;
      }
    }
  }
  if (!leader) return;
  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
  for (int u = t; u < d.T; ++u) {
    if (new_token_region(m, d, b, u) != r) continue;
    float k[kVec];
    dev::load16(key + ((size_t(b) * d.Hkv + h) * d.T + u) * D + size_t(c) * kVec, k);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] += k[i];
  }
  float* row = desc + ((size_t(b) * d.Hkv + h) * d.R + r) * D + size_t(c) * kVec;
#pragma unroll
  for (int i = 0; i < kVec; ++i) row[i] += acc[i];
}

__global__ void region_init_kernel(int32_t* count, int64_t* last, int total) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < total) {
    count[i] = 0;
    last[i] = -1;
  }
}

// One block per batch entry walks its S slots in order: an exclusive block scan of packed
// (valid | dense << 16) flags compacts the valid and the dense slots in ascending order;
// visual slots append themselves to their region's list (sorted afterwards).
__global__ void __launch_bounds__(kIndexThreads) slot_index_kernel(Meta m, Dims d, SlotIndex idx) {
  __shared__ int warp_offset[kIndexWarps];
  __shared__ int chunk_total;
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int base_valid = 0, base_dense = 0;  // identical in every thread
  for (int chunk = 0; chunk < d.S; chunk += kIndexThreads) {
    const int s = chunk + tid;
    bool valid = false, dense = false;
    if (s < d.S) {
      const size_t at = size_t(b) * d.S + s;
      valid = m.slot_valid[at] != 0;
      const int64_t r = m.slot_region[at];
      dense = valid && r < 0;
      if (valid && r >= 0) {
        if (r >= d.R) {
          atomicOr(idx.error_flags, kErrRegionId);
        } else {
          const size_t br = size_t(b) * d.R + r;
          const int j = atomicAdd(idx.region_count + br, 1);
          if (j < d.mrt) {
            idx.region_slots[br * d.mrt + j] = s;
          } else {
            atomicOr(idx.error_flags, kErrRegionOverfull);
          }
          atomicMax(reinterpret_cast<long long*>(idx.region_last + br), static_cast<long long>(m.slot_pos[at]));
        }
      }
    }
    const int packed = int(valid) | (int(dense) << 16);
    int incl = packed;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += n;
    }
    if (lane == 31) warp_offset[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int v = lane < kIndexWarps ? warp_offset[lane] : 0;
      int x = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x += n;
      }
      if (lane < kIndexWarps) warp_offset[lane] = x - v;
      if (lane == kIndexWarps - 1) chunk_total = x;
    }
    __syncthreads();
    const int excl = incl - packed + warp_offset[warp];
    if (valid) idx.valid_slots[size_t(b) * d.S + base_valid + (excl & 0xffff)] = s;
    if (dense) idx.dense_slots[size_t(b) * d.S + base_dense + (excl >> 16)] = s;
    base_valid += chunk_total & 0xffff;
    base_dense += chunk_total >> 16;
    __syncthreads();  // chunk_total and warp_offset are rewritten by the next chunk
  }
  if (tid == 0) {
    idx.n_valid[b] = base_valid;
    idx.n_dense[b] = base_dense;
  }
}

// Slot lists of a region arrive in atomic order; sorting them makes every run read keys in
// the same order (bit-reproducible sums). Lists are short (<= max_region_tokens).
__global__ void region_sort_kernel(SlotIndex idx, int total, int mrt) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int n = min(idx.region_count[i], mrt);
  int32_t* list = idx.region_slots + size_t(i) * mrt;
  for (int a = 1; a < n; ++a) {
    const int32_t v = list[a];
    int j = a - 1;
    while (j >= 0 && list[j] > v) {
      list[j + 1] = list[j];
      --j;
    }
    list[j + 1] = v;
  }
}

}  // namespace

void kv_write(DType dtype, const Dims& d, const void* key, const void* value, void* key_cache, void* value_cache,
              float* desc, const Meta& m, int32_t* error_flags, cudaStream_t st) {
  dispatch(dtype, d.D, [&](auto tag, auto dim) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kD = decltype(dim)::value;
    const dim3 grid(d.T, d.Hkv, d.B);
    GAZE_LAUNCH(grid, kD / dev::Vec<T>::kN, 0, st, kv_write_kernel<T, kD>)(
        static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(key_cache),
        static_cast<T*>(value_cache), m, d, error_flags);
    GAZE_LAUNCH(grid, kD / dev::Vec<T>::kN, 0, st, desc_sum_kernel<T, kD>)(static_cast<const T*>(key), desc, m, d);
  });
}

void build_slot_index(const Dims& d, const Meta& m, const SlotIndex& idx, cudaStream_t st) {
  const int regions = d.B * d.R;
  GAZE_LAUNCH((regions + 255) / 256, 256, 0, st, region_init_kernel)(idx.region_count, idx.region_last, regions);
  GAZE_LAUNCH(d.B, kIndexThreads, 0, st, slot_index_kernel)(m, d, idx);
  GAZE_LAUNCH((regions + 127) / 128, 128, 0, st, region_sort_kernel)(idx, regions, d.mrt);
}

}  // namespace launch
}  // namespace gaze
