// Launch API of the gaze attention CUDA kernels. Knows nothing of TensorRT.
//
// One call, `forward`, runs the whole node (docs/ONNX_CONTRACT.md) on a stream.
// Node v2 (Tensors::dense_slots set): the layout tables are inputs shared by all layers and
// step 3 is skipped; present must alias past (a v2 call with separate buffers is refused: the
// runtime binds one buffer, and a full-cache copy per layer would cost more than the attention).
// A dense query attends over the written prefix [0, write_offset + T) with validity, position and
// (context_attention = own_image) image masks; a gaze query over dense_slots + its selected
// regions' region_slots; routing = query_head selects per query head ([B, Hq, T, k]).
// Node v1 (tables null), kept for the v1 tests and benchmarks:
//   1. copy past -> present when they are different buffers (in place otherwise);
//   2. KV write at write_offset + fp32 descriptor sums (kv_write_kernel);
//   3. slot index in the workspace: per batch entry the ordered lists of valid slots and of
//      valid dense slots, per region its valid slot count, last position and sorted slot list
//      (region_init / slot_index / region_sort kernels);
//   4. dense queries of a prefill chunk (T > kDecodeMaxT): causal tiled attention (prefill kernel);
//   5. per chunk of kQueryChunk queries: region scoring + top-k for gaze queries (select kernel),
//      then split-KV attention over dense slots + selected regions (decode kernel; with
//      T <= kDecodeMaxT it serves dense queries too), then the log-sum-exp merge of splits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/gaze_host.h"

namespace gaze {

struct Tensors {
  const void* query;       // [B, Hq, T, D]
  const void* key;         // [B, Hkv, T, D]
  const void* value;       // [B, Hkv, T, D]
  const void* past_key;    // [B, Hkv, S, D]
  const void* past_value;  // [B, Hkv, S, D]
  const float* past_desc;  // [B, Hkv, R, D]
  const int64_t* slot_pos;     // [B, S]
  const int64_t* slot_region;  // [B, S]
  const uint8_t* slot_valid;   // [B, S] bool
  const uint8_t* gaze;         // [B, T] bool
  const int64_t* write_offset; // [1], device memory
  void* output;                // [B, Hq, T, D]
  void* present_key;           // may equal past_key (in place)
  void* present_value;         // may equal past_value
  float* present_desc;         // may equal past_desc
  // Node v2: the runtime's layout tables (docs/ONNX_CONTRACT.md, inputs 10 and 12..15). With
  // dense_slots set the call runs on them (see forward); null: node v1 (slot index built per call).
  const int64_t* slot_image = nullptr;     // [B, S] (needed by context_attention = own_image)
  const int64_t* dense_slots = nullptr;    // [B, N], -1 padding, any order
  const int64_t* region_slots = nullptr;   // [B, R, max_region_tokens], -1 padding
  const int64_t* region_count = nullptr;   // [B, R]
  const int64_t* region_last = nullptr;    // [B, R]
  int64_t dense_len = 0;                   // N >= 1
};

// Optional outputs for tests: selected region ids [B, Hsel, T, kmax] (-1 past n_sel) and
// counts [B, Hsel, T] (0 for dense queries), Hsel = Hkv (routing kv_head) or Hq (query_head).
// Null pointers: not written.
struct DebugOutputs {
  int32_t* selected = nullptr;
  int32_t* num_selected = nullptr;
  // Benchmarks time stages alone: bit 1 KV write + slot index, bit 2 region selection,
  // bit 4 attention (prefill, decode, merge). Anything but 7 leaves the output incomplete.
  int32_t stage_mask = 7;
};

// Node v2 workspace (issue #12): error flags (offset 0, as in v1, so gaze_device_errors reads both),
// the selections of one query chunk, the split-KV partials and the selection's per-part candidates
// (plan_select_parts); none of v1's slot-index arrays. Monotone in every dimension like
// workspace_layout. Not bounded by it (the candidates can outweigh the slot index at few rows and
// many regions): the TensorRT plugin asks workspace_size_v2.
WorkspaceLayout workspace_layout_v2(const Problem& p);
size_t workspace_size_v2(const Problem& p);

// Returns cudaSuccess or the launch error; throws gaze::Error for an unsupported problem,
// a too-small workspace or misaligned pointers (checked before anything is launched).
cudaError_t forward(const Problem& p, const Attributes& attrs, const Tensors& x, void* workspace,
                    size_t workspace_bytes, int num_sms, cudaStream_t stream, const DebugOutputs* debug = nullptr);

}  // namespace gaze
