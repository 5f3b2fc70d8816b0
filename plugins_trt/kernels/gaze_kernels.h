// Launch API of the gaze attention CUDA kernels. Knows nothing of TensorRT.
//
// One call, `forward`, runs the whole node (docs/ONNX_CONTRACT.md) on a stream:
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
};

// Optional outputs for tests: selected region ids [B, Hkv, T, kmax] (-1 past n_sel) and
// counts [B, Hkv, T] (0 for dense queries). Null pointers: not written.
struct DebugOutputs {
  int32_t* selected = nullptr;
  int32_t* num_selected = nullptr;
  // Benchmarks time stages alone: bit 1 KV write + slot index, bit 2 region selection,
  // bit 4 attention (prefill, decode, merge). Anything but 7 leaves the output incomplete.
  int32_t stage_mask = 7;
};

// Returns cudaSuccess or the launch error; throws gaze::Error for an unsupported problem,
// a too-small workspace or misaligned pointers (checked before anything is launched).
cudaError_t forward(const Problem& p, const Attributes& attrs, const Tensors& x, void* workspace,
                    size_t workspace_bytes, int num_sms, cudaStream_t stream, const DebugOutputs* debug = nullptr);

}  // namespace gaze
