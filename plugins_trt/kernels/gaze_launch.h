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
};

struct Meta {
  const int64_t* slot_pos;
  const int64_t* slot_region;
  const uint8_t* slot_valid;
  const uint8_t* gaze;
  const int64_t* write_offset;
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
