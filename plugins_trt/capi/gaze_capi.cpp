// C ABI over gaze_host (plain C++) and the kernels: see gaze_capi.h.
#include "gaze_capi.h"

#include <cuda_runtime.h>

#include <exception>
#include <string>
#include <vector>

#include "../common/gaze_host.h"
#include "../kernels/gaze_kernels.h"

namespace {

thread_local std::string g_last_error;

int32_t fail(int32_t status, const std::string& msg) {
  g_last_error = msg;
  return status;
}

// Runs f, mapping exceptions to status codes and messages.
template <typename F>
int32_t guarded(F&& f) {
  try {
    g_last_error.clear();
    return f();
  } catch (const gaze::Error& e) {
    return fail(e.kind() == gaze::Error::kUnsupported ? GAZE_ERR_UNSUPPORTED : GAZE_ERR_INVALID, e.what());
  } catch (const std::exception& e) {
    return fail(GAZE_ERR_INTERNAL, e.what());
  }
}

gaze::TensorDesc to_desc(const gaze_tensor_desc_t& t) {
  if (t.nb_dims < 0 || t.nb_dims > gaze::kMaxDims)
    throw gaze::Error(gaze::Error::kInvalid, "tensor rank " + std::to_string(t.nb_dims) + " out of range");
  gaze::TensorDesc d;
  d.dtype = static_cast<gaze::DType>(t.dtype);
  d.nb_dims = t.nb_dims;
  for (int i = 0; i < t.nb_dims; ++i) d.dims[i] = t.dims[i];
  return d;
}

gaze::Problem to_problem(const gaze_problem_t* p) {
  if (p == nullptr) throw gaze::Error(gaze::Error::kInvalid, "problem is null");
  gaze::Problem q;
  q.batch = p->batch;
  q.new_tokens = p->new_tokens;
  q.cache_len = p->cache_len;
  q.num_regions = p->num_regions;
  q.q_heads = p->q_heads;
  q.kv_heads = p->kv_heads;
  q.head_dim = p->head_dim;
  q.dtype = static_cast<gaze::DType>(p->dtype);
  q.top_k = p->top_k;
  q.max_region_tokens = p->max_region_tokens;
  return q;
}

int32_t cuda_fail(cudaError_t e, const char* what) {
  return fail(GAZE_ERR_CUDA, std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace

extern "C" {

int gaze_abi_version(void) { return GAZE_ABI_VERSION; }

const char* gaze_last_error(void) { return g_last_error.c_str(); }

const char* gaze_status_name(int32_t status) {
  switch (status) {
    case GAZE_OK: return "ok";
    case GAZE_ERR_INVALID: return "invalid argument";
    case GAZE_ERR_UNSUPPORTED: return "unsupported";
    case GAZE_ERR_CUDA: return "CUDA error";
    case GAZE_ERR_DEVICE: return "device-side contract violation";
    case GAZE_ERR_INTERNAL: return "internal error";
    default: return "unknown status";
  }
}

int32_t gaze_attribute_count(void) { return static_cast<int32_t>(gaze::attribute_names().size()); }

const char* gaze_attribute_name(int32_t i) {
  const auto& names = gaze::attribute_names();
  return i >= 0 && i < static_cast<int32_t>(names.size()) ? names[i].c_str() : nullptr;
}

int32_t gaze_parse_attributes(const gaze_field_t* fields, int32_t num_fields, gaze_attrs_t* out) {
  return guarded([&] {
    if (out == nullptr) return fail(GAZE_ERR_INVALID, "output attributes pointer is null");
    std::vector<gaze::Field> f(num_fields > 0 ? num_fields : 0);
    for (int32_t i = 0; i < num_fields; ++i)
      f[i] = gaze::Field{fields[i].name, fields[i].data, static_cast<gaze::FieldType>(fields[i].type),
                         fields[i].length};
    const gaze::Attributes a = gaze::parse_attributes(f.data(), num_fields);
    *out = gaze_attrs_t{a.top_k, a.max_region_tokens, a.scale, a.routing, a.context_attention};
    return int32_t(GAZE_OK);
  });
}

static gaze::Attributes to_attrs(const gaze_attrs_t* a) {
  if (a == nullptr) throw gaze::Error(gaze::Error::kInvalid, "attributes pointer is null");
  gaze::Attributes r;
  r.top_k = a->top_k;
  r.max_region_tokens = a->max_region_tokens;
  r.scale = a->scale;
  r.routing = a->routing;
  r.context_attention = a->context_attention;
  return r;
}

static std::vector<gaze::TensorDesc> to_descs(const gaze_tensor_desc_t* inputs, int32_t n) {
  if (inputs == nullptr || n < 0) throw gaze::Error(gaze::Error::kInvalid, "inputs pointer is null");
  std::vector<gaze::TensorDesc> in;
  for (int32_t i = 0; i < n; ++i) in.push_back(to_desc(inputs[i]));
  return in;
}

static int32_t infer_outputs_impl(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                                  gaze_tensor_desc_t* outputs, int32_t num_outputs, bool v2) {
  return guarded([&] {
    if (outputs == nullptr || num_outputs != gaze::kNumOutputs)
      return fail(GAZE_ERR_INVALID, "GazeAttention has 4 outputs; pass room for exactly 4");
    const auto in = to_descs(inputs, num_inputs);
    const auto out = v2 ? gaze::infer_outputs_v2(in.data(), num_inputs, to_attrs(attrs))
                        : gaze::infer_outputs(in.data(), num_inputs, to_attrs(attrs));
    for (int i = 0; i < gaze::kNumOutputs; ++i) {
      outputs[i].dtype = static_cast<int32_t>(out[i].dtype);
      outputs[i].nb_dims = out[i].nb_dims;
      for (int j = 0; j < 8; ++j) outputs[i].dims[j] = j < out[i].nb_dims ? out[i].dims[j] : 0;
    }
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_infer_outputs(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                           gaze_tensor_desc_t* outputs, int32_t num_outputs) {
  return infer_outputs_impl(inputs, num_inputs, attrs, outputs, num_outputs, false);
}

int32_t gaze_infer_outputs_v2(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                              gaze_tensor_desc_t* outputs, int32_t num_outputs) {
  return infer_outputs_impl(inputs, num_inputs, attrs, outputs, num_outputs, true);
}

int32_t gaze_supports_io_dtype(int32_t pos, int32_t dtype, int32_t query_dtype) {
  return gaze::supports_io_dtype(pos, static_cast<gaze::DType>(dtype), static_cast<gaze::DType>(query_dtype)) ? 1
                                                                                                               : 0;
}

int32_t gaze_problem_from_inputs(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                                 gaze_problem_t* out) {
  return guarded([&] {
    if (out == nullptr) return fail(GAZE_ERR_INVALID, "output problem pointer is null");
    const auto in = to_descs(inputs, num_inputs);
    const gaze::Problem p = gaze::problem_from_inputs(in.data(), num_inputs, to_attrs(attrs));
    *out = gaze_problem_t{p.batch, p.new_tokens, p.cache_len, p.num_regions, p.q_heads, p.kv_heads, p.head_dim,
                          static_cast<int32_t>(p.dtype), p.top_k, p.max_region_tokens};
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_workspace_size(const gaze_problem_t* problem, uint64_t* bytes) {
  return guarded([&] {
    if (bytes == nullptr) return fail(GAZE_ERR_INVALID, "bytes pointer is null");
    *bytes = gaze::workspace_size(to_problem(problem));
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_workspace_size_v2(const gaze_problem_t* problem, uint64_t* bytes) {
  return guarded([&] {
    if (bytes == nullptr) return fail(GAZE_ERR_INVALID, "bytes pointer is null");
    *bytes = gaze::workspace_size_v2(to_problem(problem));
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_plan_splits(const gaze_problem_t* problem, int32_t num_sms, int32_t* splits) {
  return guarded([&] {
    if (splits == nullptr) return fail(GAZE_ERR_INVALID, "splits pointer is null");
    const gaze::Problem p = to_problem(problem);
    gaze::check_problem(p);
    *splits = gaze::plan_splits(p, num_sms);
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_plan_select_parts(const gaze_problem_t* problem, int64_t rows, int32_t* parts) {
  return guarded([&] {
    if (parts == nullptr) return fail(GAZE_ERR_INVALID, "parts pointer is null");
    const gaze::Problem p = to_problem(problem);
    gaze::check_problem(p);
    *parts = gaze::plan_select_parts(p, rows);
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_dispatch_count(void) { return static_cast<int32_t>(gaze::dispatch_table().size()); }

int32_t gaze_dispatch_entry(int32_t i, int32_t* dtype, int32_t* head_dim, const char** name) {
  const auto& t = gaze::dispatch_table();
  if (i < 0 || i >= static_cast<int32_t>(t.size()))
    return fail(GAZE_ERR_INVALID, "dispatch entry " + std::to_string(i) + " out of range");
  if (dtype) *dtype = static_cast<int32_t>(t[i].dtype);
  if (head_dim) *head_dim = t[i].head_dim;
  if (name) *name = t[i].name;
  return GAZE_OK;
}

int32_t gaze_dispatch_supported(int32_t dtype, int64_t head_dim) {
  return gaze::dispatch_supported(static_cast<gaze::DType>(dtype), head_dim) ? 1 : 0;
}

const char* gaze_describe_device_errors(int32_t flags) {
  thread_local std::string text;
  text = gaze::describe_device_errors(flags);
  return text.c_str();
}

int32_t gaze_cuda_device_count(int32_t* count) {
  if (count == nullptr) return fail(GAZE_ERR_INVALID, "count pointer is null");
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error: no driver or no device
    n = 0;
    g_last_error = std::string("no CUDA device: ") + cudaGetErrorString(e);
  }
  *count = n;
  return GAZE_OK;
}

static int32_t forward_impl(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_t* t,
                            void* workspace, uint64_t workspace_bytes, void* stream, int32_t* selected,
                            int32_t* num_selected, int32_t stage_mask, const gaze_tensors_v2_t* t2 = nullptr) {
  return guarded([&] {
    if (t == nullptr) return fail(GAZE_ERR_INVALID, "tensors pointer is null");
    if (t2 == nullptr && attrs != nullptr && (attrs->routing != 0 || attrs->context_attention != 0))
      return fail(GAZE_ERR_INVALID, "routing/context_attention need the node v2 tables: call gaze_forward_v2");
    int device = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDevice");
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return cuda_fail(e, "cudaDeviceGetAttribute");
    gaze::Tensors x{t->query, t->key, t->value, t->past_key, t->past_value, t->past_desc, t->slot_pos,
                    t->slot_region, t->slot_valid, t->gaze, t->write_offset, t->output, t->present_key,
                    t->present_value, t->present_desc};
    if (t2 != nullptr) {
      x.slot_image = t2->slot_image;
      x.dense_slots = t2->dense_slots;
      x.region_slots = t2->region_slots;
      x.region_count = t2->region_count;
      x.region_last = t2->region_last;
      x.dense_len = t2->dense_len;
      if (x.dense_slots == nullptr) return fail(GAZE_ERR_INVALID, "dense_slots is null");
    }
    gaze::DebugOutputs dbg{selected, num_selected, stage_mask};
    e = gaze::forward(to_problem(problem), to_attrs(attrs), x, workspace, workspace_bytes, sms,
                      static_cast<cudaStream_t>(stream), &dbg);
    if (e != cudaSuccess) return cuda_fail(e, "gaze forward launch");
    return int32_t(GAZE_OK);
  });
}

int32_t gaze_forward(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_t* t,
                     void* workspace, uint64_t workspace_bytes, void* stream, int32_t* selected,
                     int32_t* num_selected) {
  return forward_impl(problem, attrs, t, workspace, workspace_bytes, stream, selected, num_selected, 7);
}

int32_t gaze_forward_v2(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_v2_t* t,
                        void* workspace, uint64_t workspace_bytes, void* stream, int32_t* selected,
                        int32_t* num_selected, int32_t stage_mask) {
  if (t == nullptr) return fail(GAZE_ERR_INVALID, "tensors pointer is null");
  if (stage_mask < 0 || stage_mask > 7) return fail(GAZE_ERR_INVALID, "stage_mask must be in 0..7");
  return forward_impl(problem, attrs, &t->base, workspace, workspace_bytes, stream, selected, num_selected,
                      stage_mask, t);
}

int32_t gaze_forward_stages(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_t* t,
                            void* workspace, uint64_t workspace_bytes, void* stream, int32_t stage_mask) {
  if (stage_mask < 0 || stage_mask > 7) return fail(GAZE_ERR_INVALID, "stage_mask must be in 0..7");
  return forward_impl(problem, attrs, t, workspace, workspace_bytes, stream, nullptr, nullptr, stage_mask);
}

int32_t gaze_device_errors(const gaze_problem_t* problem, const void* workspace, void* stream, int32_t* flags) {
  return guarded([&] {
    if (flags == nullptr || workspace == nullptr) return fail(GAZE_ERR_INVALID, "null pointer");
    const gaze::WorkspaceLayout w = gaze::workspace_layout(to_problem(problem));
    cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return cuda_fail(e, "cudaStreamSynchronize");
    e = cudaMemcpy(flags, static_cast<const char*>(workspace) + w.error_flags, sizeof(int32_t),
                   cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return cuda_fail(e, "cudaMemcpy");
    if (*flags) return fail(GAZE_ERR_DEVICE, gaze::describe_device_errors(*flags));
    return int32_t(GAZE_OK);
  });
}

}  // extern "C"
