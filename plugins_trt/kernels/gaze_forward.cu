// The whole GazeAttention node on one stream: see the step list in gaze_kernels.h.
#include <algorithm>
#include <cstdint>
#include <string>

#include "gaze_kernels.h"
#include "gaze_launch.h"

namespace gaze {
namespace {

void require_aligned(const void* p, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw Error(Error::kInvalid, std::string(name) + " is not 16-byte aligned (the kernels use 16-byte loads)");
}

void require(const void* p, const char* name) {
  if (p == nullptr) throw Error(Error::kInvalid, std::string(name) + " is null");
}

}  // namespace

WorkspaceLayout workspace_layout_v2(const Problem& p) {
  const WorkspaceLayout v1 = workspace_layout(p);  // checks the problem; chunk sizes are v1's
  WorkspaceLayout w{};
  WorkspaceCursor cursor;
  auto take = [&cursor](size_t bytes) { return cursor.take(bytes); };
  w.query_chunk = v1.query_chunk;
  w.partial_queries = v1.partial_queries;
  w.error_flags = take(sizeof(int32_t));
  // No slot index in v2: these offsets are never used (forward passes null pointers for them).
  w.region_count = w.region_last = w.region_slots = w.valid_slots = w.dense_slots = w.n_valid = w.n_dense = 0;
  w.sel = take(v1.n_sel - v1.sel);
  w.n_sel = take(v1.part_acc - v1.n_sel);
  w.part_acc = take(v1.part_ml - v1.part_acc);
  w.part_ml = take(v1.total - v1.part_ml);
  // Selection candidates (issue #12): a launch of `rows` selection rows (B x Hsel x queries) in parts
  // (plan_select_parts: rows x parts <= kSelectPartBlocks) has each part write its top
  // min(kmax, kSelectPartRegions) 64-bit keys and their number; sized for the largest rows x parts any
  // launch of this problem can have, min(B x Hq x chunk x max parts, kSelectPartBlocks) (monotone).
  const int64_t max_parts = plan_select_parts(p, 1);
  if (max_parts > 1) {
    const size_t blocks = std::min<size_t>(size_t(p.batch) * p.q_heads * size_t(w.query_chunk) * size_t(max_parts),
                                           kSelectPartBlocks);
    const size_t cap = std::min<size_t>(size_t(p.kmax()), kSelectPartRegions);
    w.sel_cand = take(blocks * cap * sizeof(uint64_t));
    w.sel_cand_n = take(blocks * sizeof(int32_t));
  }
  w.total = cursor.size();
  return w;
}

size_t workspace_size_v2(const Problem& p) { return workspace_layout_v2(p).total; }

cudaError_t forward(const Problem& p, const Attributes& attrs, const Tensors& x, void* workspace,
                    size_t workspace_bytes, int num_sms, cudaStream_t stream, const DebugOutputs* debug) {
  validate_attributes(attrs);
  const bool v2 = x.dense_slots != nullptr;
  const WorkspaceLayout w = v2 ? workspace_layout_v2(p) : workspace_layout(p);  // checks the problem
  if (workspace == nullptr || workspace_bytes < w.total)
    throw Error(Error::kInvalid, "workspace of " + std::to_string(workspace_bytes) + " bytes is smaller than the " +
                                     std::to_string(w.total) + " this call needs");
  const void* vec_ptrs[] = {x.query, x.key, x.value, x.past_key, x.past_value, x.past_desc,
                            x.output, x.present_key, x.present_value, x.present_desc, workspace};
  const char* vec_names[] = {"query", "key", "value", "past_key", "past_value", "past_desc",
                             "output", "present_key", "present_value", "present_desc", "workspace"};
  for (int i = 0; i < 11; ++i) {
    require(vec_ptrs[i], vec_names[i]);
    require_aligned(vec_ptrs[i], vec_names[i]);
  }
  require(x.slot_pos, "slot_pos");
  require(x.slot_region, "slot_region");
  require(x.slot_valid, "slot_valid");
  require(x.gaze, "gaze");
  require(x.write_offset, "write_offset");
  if (v2) {
    require(x.region_slots, "region_slots");
    require(x.region_count, "region_count");
    require(x.region_last, "region_last");
    if (x.dense_len < 1) throw Error(Error::kInvalid, "dense_slots must have N >= 1 columns");
    if (x.present_key != x.past_key || x.present_value != x.past_value || x.present_desc != x.past_desc)
      throw Error(Error::kInvalid,
                  "GazeAttention v2 runs in place only: present_key/value/desc must be the past buffers "
                  "(a separate present would need a full-cache copy per layer and call)");
  }
  if (attrs.context_attention == kContextOwnImage) require(x.slot_image, "slot_image");

  const size_t elem = p.dtype == DType::kF32 ? 4 : 2;
  const size_t cache_bytes = size_t(p.batch) * p.kv_heads * p.cache_len * p.head_dim * elem;
  const size_t desc_bytes = size_t(p.batch) * p.kv_heads * p.num_regions * p.head_dim * sizeof(float);
  cudaError_t err;
  // Node v1 only (v2 refuses this above). Not aliased: present starts as a full copy of past.
  if (x.present_key != x.past_key &&
      (err = cudaMemcpyAsync(x.present_key, x.past_key, cache_bytes, cudaMemcpyDeviceToDevice, stream)))
    return err;
  if (x.present_value != x.past_value &&
      (err = cudaMemcpyAsync(x.present_value, x.past_value, cache_bytes, cudaMemcpyDeviceToDevice, stream)))
    return err;
  if (x.present_desc != x.past_desc &&
      (err = cudaMemcpyAsync(x.present_desc, x.past_desc, desc_bytes, cudaMemcpyDeviceToDevice, stream)))
    return err;

  char* ws = static_cast<char*>(workspace);
  launch::SlotIndex idx{};
  idx.error_flags = reinterpret_cast<int32_t*>(ws + w.error_flags);
  if (!v2) {  // v1's per-call slot index; v2 has none (its workspace has no room for it)
    idx.region_count = reinterpret_cast<int32_t*>(ws + w.region_count);
    idx.region_last = reinterpret_cast<int64_t*>(ws + w.region_last);
    idx.region_slots = reinterpret_cast<int32_t*>(ws + w.region_slots);
    idx.valid_slots = reinterpret_cast<int32_t*>(ws + w.valid_slots);
    idx.dense_slots = reinterpret_cast<int32_t*>(ws + w.dense_slots);
    idx.n_valid = reinterpret_cast<int32_t*>(ws + w.n_valid);
    idx.n_dense = reinterpret_cast<int32_t*>(ws + w.n_dense);
  }
  if ((err = cudaMemsetAsync(idx.error_flags, 0, sizeof(int32_t), stream))) return err;

  launch::Dims d;
  d.B = int32_t(p.batch);
  d.T = int32_t(p.new_tokens);
  d.S = int32_t(p.cache_len);
  d.R = int32_t(p.num_regions);
  d.Hq = int32_t(p.q_heads);
  d.Hkv = int32_t(p.kv_heads);
  d.G = int32_t(p.group());
  d.D = int32_t(p.head_dim);
  d.mrt = p.max_region_tokens;
  d.kmax = int32_t(p.kmax());
  d.per_head = attrs.routing == kRoutingQueryHead ? 1 : 0;
  d.own_image = attrs.context_attention == kContextOwnImage ? 1 : 0;
  d.Hsel = d.per_head ? d.Hq : d.Hkv;
  launch::Meta meta{x.slot_pos, x.slot_region, x.slot_valid, x.gaze, x.write_offset, x.slot_image};
  if (v2) {
    idx.t_dense = x.dense_slots;
    idx.t_region_slots = x.region_slots;
    idx.t_region_count = x.region_count;
    idx.t_region_last = x.region_last;
    idx.N = int32_t(x.dense_len);
    idx.v2 = 1;
  }

  const int32_t stages = debug ? debug->stage_mask : 7;
  if (stages & 1) {
    launch::kv_write(p.dtype, d, x.key, x.value, x.present_key, x.present_value, x.present_desc, meta,
                     idx.error_flags, stream);
    if (!v2) launch::build_slot_index(d, meta, idx, stream);
  }

  launch::AttentionArgs att{};
  att.query = x.query;
  att.key_cache = x.present_key;
  att.value_cache = x.present_value;
  att.meta = meta;
  att.idx = idx;
  att.out = x.output;
  att.part_acc = reinterpret_cast<float*>(ws + w.part_acc);
  att.part_ml = reinterpret_cast<float*>(ws + w.part_ml);
  att.scale = attrs.scale;
  const bool decode_all = p.new_tokens <= kDecodeMaxT;
  att.handle_dense = decode_all ? 1 : 0;
  att.splits = decode_all ? plan_splits(p, num_sms) : 1;
  if (!decode_all && (stages & 4)) {
    att.t0 = 0;
    att.qc = d.T;
    launch::prefill_attention(p.dtype, d, att, stream);
  }

  launch::SelectArgs sel{};
  sel.query = x.query;
  sel.desc = x.present_desc;
  sel.meta = meta;
  sel.idx = idx;
  sel.sel = reinterpret_cast<int32_t*>(ws + w.sel);
  sel.n_sel = reinterpret_cast<int32_t*>(ws + w.n_sel);
  att.sel = sel.sel;
  att.n_sel = sel.n_sel;
  sel.cand = w.sel_cand_n ? reinterpret_cast<uint64_t*>(ws + w.sel_cand) : nullptr;
  sel.cand_n = w.sel_cand_n ? reinterpret_cast<int32_t*>(ws + w.sel_cand_n) : nullptr;
  sel.cap = int32_t(std::min<int64_t>(d.kmax, kSelectPartRegions));
  for (int32_t t0 = 0; t0 < d.T; t0 += int32_t(w.query_chunk)) {
    const int32_t qc = std::min<int32_t>(int32_t(w.query_chunk), d.T - t0);
    sel.t0 = att.t0 = t0;
    sel.qc = att.qc = qc;
    // Node v2 with few selection rows: regions split over several CTAs, candidates merged (the
    // workspace has room for every such launch); v1 (no candidate area) keeps one CTA per row.
    sel.parts = sel.cand ? plan_select_parts(p, int64_t(d.B) * d.Hsel * qc) : 1;
    if (stages & 2) launch::select_regions(p.dtype, d, sel, stream);
    if (stages & 4) {
      launch::decode_attention(p.dtype, d, att, stream);
      if (att.splits > 1) launch::merge_splits(p.dtype, d, att, stream);
    }
    if (debug && debug->selected) {  // [B*Hsel rows] x [qc*kmax] -> [B*Hkv rows] x [T*kmax] at column t0*kmax
      const size_t row = size_t(qc) * d.kmax * sizeof(int32_t);
      if (row && (err = cudaMemcpy2DAsync(debug->selected + size_t(t0) * d.kmax, size_t(d.T) * d.kmax * 4,
                                          sel.sel, row, row, size_t(d.B) * d.Hsel, cudaMemcpyDeviceToDevice,
                                          stream)))
        return err;
    }
    if (debug && debug->num_selected &&
        (err = cudaMemcpy2DAsync(debug->num_selected + t0, size_t(d.T) * 4, sel.n_sel, size_t(qc) * 4,
                                 size_t(qc) * 4, size_t(d.B) * d.Hsel, cudaMemcpyDeviceToDevice, stream)))
      return err;
  }
  return cudaGetLastError();
}

}  // namespace gaze
