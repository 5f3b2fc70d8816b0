// Internal launchers of the gaze kernels (used by gaze_forward.cu only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/gaze_host.h"

namespace gaze {
namespace launch {

// Sizes shared by every kernel of one call.
struct Dims {
  int32_t B, T, S, R, Hq, Hkv, G, D, mrt, kmax;
  // Node v2 attributes: per_head = routing query_head (one selection per query head, Hsel = Hq;
  // kv_head: Hsel = Hkv); own_image = context_attention own_image.
  int32_t per_head = 0, own_image = 0, Hsel = 0;
};

// The workspace slot index (see gaze_kernels.h, step 3).
struct SlotIndex {
  int32_t* error_flags;
  int32_t* region_count;   // [B, R] valid slots per region (may exceed mrt: flagged)
  int64_t* region_last;    // [B, R] last position of a valid slot, -1 if none
  int32_t* region_slots;   // [B, R, mrt] slot ids, ascending, first min(count, mrt) valid
  int32_t* valid_slots;    // [B, S] ascending valid slot ids, first n_valid[b]
  int32_t* dense_slots;    // [B, S] ascending valid dense (region -1) slot ids, first n_dense[b]
  int32_t* n_valid;        // [B]
  int32_t* n_dense;        // [B]
  // Node v2: the runtime's layout tables (docs/ONNX_CONTRACT.md), shared by all layers; v2 != 0
  // selects them and nothing above is built (no per-call pass over S): the dense list of a gaze
  // query is t_dense (any order, -1 padding), regions are t_region_*; a dense query's keys are the
  // written prefix [0, write_offset + T), masked by validity, position and (own_image) image.
  const int64_t* t_dense = nullptr;         // [B, N]
  const int64_t* t_region_slots = nullptr;  // [B, R, mrt]
  const int64_t* t_region_count = nullptr;  // [B, R]
  const int64_t* t_region_last = nullptr;   // [B, R]
  int32_t N = 0;
  int32_t v2 = 0;

  __device__ __forceinline__ int count(size_t br) const {
    return v2 ? int(t_region_count[br]) : region_count[br];
  }
  __device__ __forceinline__ int64_t last(size_t br) const { return v2 ? t_region_last[br] : region_last[br]; }
};

struct Meta {
  const int64_t* slot_pos;
  const int64_t* slot_region;
  const uint8_t* slot_valid;
  const uint8_t* gaze;
  const int64_t* write_offset;
  const int64_t* slot_image = nullptr;  // [B, S], node v2 (own_image context queries)
};

void kv_write(DType dtype, const Dims& d, const void* key, const void* value, void* key_cache, void* value_cache,
              float* desc, const Meta& m, int32_t* error_flags, cudaStream_t st);
void build_slot_index(const Dims& d, const Meta& m, const SlotIndex& idx, cudaStream_t st);

struct SelectArgs {
  const void* query;  // [B, Hq, T, D]
  const float* desc;  // [B, Hkv, R, D] sums
  Meta meta;
  SlotIndex idx;
  int32_t* sel;    // [B, Hkv, qc, kmax]
  int32_t* n_sel;  // [B, Hkv, qc]
  int32_t t0, qc;
  // Region parts (issue #12): parts > 1 splits each row's R regions over `parts` CTAs, each writing its
  // top min(cap, eligible) keys to cand [B, Hsel, qc, parts, cap] and that number to cand_n
  // [B, Hsel, qc, parts]; a merge kernel ranks the union. parts = 1: one CTA per row sorts all R.
  uint64_t* cand = nullptr;
  int32_t* cand_n = nullptr;
  int32_t parts = 1, cap = 0;
};
void select_regions(DType dtype, const Dims& d, const SelectArgs& a, cudaStream_t st);

struct AttentionArgs {
  const void* query;
  const void* key_cache;
  const void* value_cache;
  Meta meta;
  SlotIndex idx;
  const int32_t* sel;
  const int32_t* n_sel;
  void* out;
  float* part_acc;  // [B, qc, Hq, splits, D]
  float* part_ml;   // [B, qc, Hq, splits, 2]
  int32_t t0, qc, splits;
  int32_t handle_dense;  // the decode kernel also serves dense queries (T <= kDecodeMaxT)
  float scale;
};
void decode_attention(DType dtype, const Dims& d, const AttentionArgs& a, cudaStream_t st);
void merge_splits(DType dtype, const Dims& d, const AttentionArgs& a, cudaStream_t st);
void prefill_attention(DType dtype, const Dims& d, const AttentionArgs& a, cudaStream_t st);

}  // namespace launch
}  // namespace gaze
