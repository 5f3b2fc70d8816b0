// Host-side rules of the gaze::GazeAttention node (docs/ONNX_CONTRACT.md), plain C++.
//
// No TensorRT and no CUDA here: attribute parsing from a name->value field list (as
// TensorRT's PluginFieldCollection delivers it), input/output shape and dtype rules,
// the dispatch table, the launch plan and the workspace layout. The TensorRT plugin,
// the C ABI (tests without a GPU) and the kernel launcher all use these functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace gaze {

// Values mirror nvinfer1::DataType so the plugin glue can cast.
enum class DType : int32_t { kF32 = 0, kF16 = 1, kI32 = 3, kBool = 4, kBF16 = 7, kI64 = 8 };
// Values mirror nvinfer1::PluginFieldType.
enum class FieldType : int32_t { kF16 = 0, kF32 = 1, kF64 = 2, kI8 = 3, kI16 = 4, kI32 = 5, kChar = 6, kDims = 7,
                                 kUnknown = 8, kBF16 = 9, kI64 = 10 };

constexpr const char* kPluginName = "GazeAttention";
constexpr const char* kPluginVersion = "2";  // node v2 (16 inputs); v1 nodes are re-exported
constexpr const char* kPluginNamespace = "gaze";

constexpr int kNumInputs = 11;
constexpr int kNumOutputs = 4;
constexpr int kMaxDims = 8;
constexpr int kMaxGroup = 8;            // query heads per KV head
constexpr int kMaxRegions = 4096;       // R: the top-k sort holds all regions in shared memory
constexpr int kMaxRegionTokens = 256;   // per-region slot lists are sorted by one thread
constexpr int kDecodeMaxT = 8;          // calls with T <= this run every query through split-KV decode
constexpr int kQueryChunk = 64;         // gaze queries scored/selected per launch (bounds the workspace)
constexpr int kMaxSplits = 16;          // split-KV partitions per query
constexpr int kMinKeysPerSplit = 128;
// Selection split over regions (node v2, issue #12): a (query, selection head, sequence) row's R
// regions are scored by up to kMaxSelectParts CTAs of <= kSelectPartRegions regions each, then merged,
// while rows x parts stays <= kSelectPartBlocks (B x Hsel x queries rows: more rows need fewer parts).
constexpr int kSelectPartRegions = 256;
constexpr int kMaxSelectParts = 16;     // kMaxSelectParts * kSelectPartRegions >= kMaxRegions
constexpr int kSelectPartBlocks = 256;  // selection CTAs a launch in parts aims at (about 2 per SM)
constexpr size_t kWorkspaceAlign = 256;

// Lays workspace arrays out one after another, each starting kWorkspaceAlign-aligned: take(bytes)
// returns the array's offset, size() the bytes taken so far (the v1 and v2 layouts share it).
struct WorkspaceCursor {
  size_t off = 0;
  size_t take(size_t bytes) {
    const size_t at = off;
    off += (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
    return at;
  }
  size_t size() const { return off; }
};

// Input order of the node.
enum Input : int { kQuery = 0, kKey, kValue, kPastKey, kPastValue, kPastDesc, kSlotPos, kSlotRegion, kSlotValid,
                   kGaze, kWriteOffset };

class Error : public std::runtime_error {
 public:
  enum Kind { kInvalid = 1, kUnsupported = 2 };
  Error(Kind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// Node v2 attributes `routing` and `context_attention` (docs/ONNX_CONTRACT.md). They are parsed
// when present and default to 0 (kv_head, causal), the only behaviour of node v1.
enum Routing : int32_t { kRoutingKvHead = 0, kRoutingQueryHead = 1 };
enum ContextAttention : int32_t { kContextCausal = 0, kContextOwnImage = 1 };

struct Attributes {
  int32_t top_k = 0;
  int32_t max_region_tokens = 0;
  float scale = 0.f;
  int32_t routing = kRoutingKvHead;
  int32_t context_attention = kContextCausal;
};

// One attribute as TensorRT's ONNX parser hands it over (PluginField): INT -> kI32 (int64
// narrowed), FLOAT -> kF32, STRING -> kChar with `length` bytes (not necessarily 0-terminated).
struct Field {
  const char* name;
  const void* data;
  FieldType type;
  int32_t length;
};

// Names the creator advertises; the parser passes only these.
const std::vector<std::string>& attribute_names();
// Throws Error(kInvalid) naming the attribute on a missing field, wrong type or bad value.
Attributes parse_attributes(const Field* fields, int num_fields);
void validate_attributes(const Attributes& attrs);

struct TensorDesc {
  DType dtype = DType::kF32;
  int32_t nb_dims = 0;
  int64_t dims[kMaxDims] = {};  // -1: not known yet (build time)
};

// Which input each output copies its shape and dtype from: output i <- input kOutputSource[i].
constexpr int kOutputSource[kNumOutputs] = {kQuery, kPastKey, kPastValue, kPastDesc};

// Checks ranks, dims and dtypes of the 11 inputs against each other and the attributes
// (unknown dims, -1, are skipped) and returns the 4 output descriptors.
std::vector<TensorDesc> infer_outputs(const TensorDesc* inputs, int num_inputs, const Attributes& attrs);
// Node v2 (docs/ONNX_CONTRACT.md, opset version 2): 16 inputs, the runtime's layout tables among them.
namespace v2 {
constexpr int kNumInputs = 16;
enum Input : int { kQuery = 0, kKey, kValue, kPastKey, kPastValue, kPastDesc, kWriteOffset, kSlotPos, kSlotValid,
                   kSlotRegion, kSlotImage, kGaze, kDenseSlots, kRegionSlots, kRegionCount, kRegionLast };
constexpr int kOutputSource[kNumOutputs] = {kQuery, kPastKey, kPastValue, kPastDesc};
}  // namespace v2
// The v2 rules: ranks, dims (B, T, S, R, N, M = max_region_tokens) and dtypes of the 16 inputs.
std::vector<TensorDesc> infer_outputs_v2(const TensorDesc* inputs, int num_inputs, const Attributes& attrs);
// supportsFormatCombination: may I/O position `pos` (inputs 0..10, outputs 11..14) have
// `dtype`, given that position 0 (query) has `query_dtype`?
bool supports_io_dtype(int pos, DType dtype, DType query_dtype);
// The same for node v2 positions (inputs 0..15, outputs 16..19), as the TensorRT plugin sees them.
bool supports_io_dtype_v2(int pos, DType dtype, DType query_dtype);

// Everything a launch depends on (actual sizes at enqueue, or the largest of a profile).
struct Problem {
  int64_t batch = 0, new_tokens = 0, cache_len = 0, num_regions = 0;
  int64_t q_heads = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::kF16;
  int32_t top_k = 0, max_region_tokens = 0;
  int64_t group() const { return kv_heads ? q_heads / kv_heads : 0; }
  int64_t kmax() const { return top_k < num_regions ? top_k : num_regions; }
};
Problem problem_from_inputs(const TensorDesc* inputs, int num_inputs, const Attributes& attrs);
// Throws Error(kUnsupported/kInvalid) with the reason when no kernel serves the problem.
void check_problem(const Problem& p);

struct DispatchEntry {
  DType dtype;
  int32_t head_dim;
  const char* name;
};
const std::vector<DispatchEntry>& dispatch_table();
bool dispatch_supported(DType dtype, int64_t head_dim);
const char* dtype_name(DType dtype);

// Split-KV partitions for a call: enough blocks to fill `num_sms` SMs twice, at least
// kMinKeysPerSplit keys per split, at most kMaxSplits; 1 when T > kDecodeMaxT.
int plan_splits(const Problem& p, int num_sms);

// Region parts of the selection (node v2) for a launch of `rows` = B x Hsel x queries selection rows:
// min(ceil(R / kSelectPartRegions), kMaxSelectParts, kSelectPartBlocks / rows), at least 1.
// The result does not depend on it: candidates are merged by a total order (score, region).
int plan_select_parts(const Problem& p, int64_t rows);

// Byte offsets of the workspace arrays (each kWorkspaceAlign-aligned). Monotone in every
// dimension, so the size at a profile's largest shape covers every shape of the profile.
struct WorkspaceLayout {
  size_t error_flags, region_count, region_last, region_slots, valid_slots, dense_slots, n_valid, n_dense;
  size_t sel, n_sel, part_acc, part_ml;
  size_t sel_cand = 0, sel_cand_n = 0;  // node v2 only: per-part top-k candidates (0 bytes when unused)
  size_t total;
  int64_t query_chunk;     // queries per select/decode launch
  int64_t partial_queries; // queries with room for split partials: min(T, kDecodeMaxT)
};
WorkspaceLayout workspace_layout(const Problem& p);
size_t workspace_size(const Problem& p);

// Device error flags the kernels set (contract violations found on the GPU).
enum DeviceError : int32_t {
  kErrWriteOffset = 1,    // write_offset + t outside [0, S)
  kErrRegionId = 2,       // a valid slot's region id >= R
  kErrRegionOverfull = 4  // a region holds more than max_region_tokens valid slots
};
std::string describe_device_errors(int32_t flags);

}  // namespace gaze
