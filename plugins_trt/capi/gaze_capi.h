/* C ABI of libgaze_kernels.so: host-side rules of the gaze::GazeAttention node (no GPU
 * needed) and the CUDA kernels (GPU needed), for tests, benchmarks and ctypes.
 *
 * Every function returns a status (GAZE_OK = 0) and leaves a message for gaze_last_error()
 * (per thread) on failure. Nothing here touches CUDA at load time. */
#ifndef GAZE_CAPI_H_
#define GAZE_CAPI_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: gaze_attrs_t gained routing/context_attention; gaze_forward_v2 (node v2 tables). */
#define GAZE_ABI_VERSION 2

enum gaze_status {
  GAZE_OK = 0,
  GAZE_ERR_INVALID = 1,     /* bad attribute, shape, dtype, pointer or workspace */
  GAZE_ERR_UNSUPPORTED = 2, /* valid per the contract but no kernel serves it */
  GAZE_ERR_CUDA = 3,        /* a CUDA call failed (message has cudaGetErrorString) */
  GAZE_ERR_DEVICE = 4,      /* kernels found a contract violation (gaze_device_errors) */
  GAZE_ERR_INTERNAL = 5
};

/* dtype codes mirror nvinfer1::DataType; field type codes mirror nvinfer1::PluginFieldType. */
enum gaze_dtype { GAZE_F32 = 0, GAZE_F16 = 1, GAZE_I32 = 3, GAZE_BOOL = 4, GAZE_BF16 = 7, GAZE_I64 = 8 };
enum gaze_field_type { GAZE_FIELD_F32 = 1, GAZE_FIELD_I32 = 5, GAZE_FIELD_CHAR = 6, GAZE_FIELD_I64 = 10 };

typedef struct {
  const char* name;
  const void* data;
  int32_t type; /* gaze_field_type (any PluginFieldType value) */
  int32_t length;
} gaze_field_t;

typedef struct {
  int32_t top_k;
  int32_t max_region_tokens;
  float scale;
  int32_t routing;           /* node v2: 0 kv_head, 1 query_head (0 for node v1) */
  int32_t context_attention; /* node v2: 0 causal, 1 own_image (0 for node v1) */
} gaze_attrs_t;

typedef struct {
  int32_t dtype;
  int32_t nb_dims;
  int64_t dims[8]; /* -1: unknown */
} gaze_tensor_desc_t;

typedef struct {
  int64_t batch, new_tokens, cache_len, num_regions, q_heads, kv_heads, head_dim;
  int32_t dtype, top_k, max_region_tokens;
} gaze_problem_t;

typedef struct {
  const void *query, *key, *value, *past_key, *past_value;
  const float* past_desc;
  const int64_t *slot_pos, *slot_region;
  const uint8_t *slot_valid, *gaze;
  const int64_t* write_offset;
  void *output, *present_key, *present_value;
  float* present_desc;
} gaze_tensors_t;

/* Node v2 (docs/ONNX_CONTRACT.md): the v1 pointers plus the runtime's layout tables. */
typedef struct {
  gaze_tensors_t base;
  const int64_t* slot_image;   /* [B, S] */
  const int64_t* dense_slots;  /* [B, N], -1 padding */
  const int64_t* region_slots; /* [B, R, max_region_tokens], -1 padding */
  const int64_t* region_count; /* [B, R] */
  const int64_t* region_last;  /* [B, R] */
  int64_t dense_len;           /* N >= 1 */
} gaze_tensors_v2_t;

int gaze_abi_version(void);
const char* gaze_last_error(void);
const char* gaze_status_name(int32_t status);

/* Host-side rules (no GPU). */
int32_t gaze_attribute_count(void);
const char* gaze_attribute_name(int32_t i);
int32_t gaze_parse_attributes(const gaze_field_t* fields, int32_t num_fields, gaze_attrs_t* out);
int32_t gaze_infer_outputs(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                           gaze_tensor_desc_t* outputs, int32_t num_outputs);
/* Node v2 shape rules: 16 inputs in the v2 order (docs/ONNX_CONTRACT.md). */
int32_t gaze_infer_outputs_v2(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                              gaze_tensor_desc_t* outputs, int32_t num_outputs);
/* 1 if I/O position pos (inputs 0..10, outputs 11..14) may have dtype given query dtype, else 0. */
int32_t gaze_supports_io_dtype(int32_t pos, int32_t dtype, int32_t query_dtype);
int32_t gaze_problem_from_inputs(const gaze_tensor_desc_t* inputs, int32_t num_inputs, const gaze_attrs_t* attrs,
                                 gaze_problem_t* out);
int32_t gaze_workspace_size(const gaze_problem_t* problem, uint64_t* bytes);
/* Node v2's workspace (issue #12): no slot-index arrays, plus the selection's per-part candidates
   (can exceed gaze_workspace_size at few rows and many regions). gaze_forward_v2 needs at least this. */
int32_t gaze_workspace_size_v2(const gaze_problem_t* problem, uint64_t* bytes);
int32_t gaze_plan_splits(const gaze_problem_t* problem, int32_t num_sms, int32_t* splits);
/* Node v2 selection: CTAs per selection row (region parts) for a launch of `rows` = B x Hsel x queries. */
int32_t gaze_plan_select_parts(const gaze_problem_t* problem, int64_t rows, int32_t* parts);
int32_t gaze_dispatch_count(void);
int32_t gaze_dispatch_entry(int32_t i, int32_t* dtype, int32_t* head_dim, const char** name);
int32_t gaze_dispatch_supported(int32_t dtype, int64_t head_dim);
/* Human-readable text for device error flags. */
const char* gaze_describe_device_errors(int32_t flags);

/* GPU. */
int32_t gaze_cuda_device_count(int32_t* count); /* GAZE_OK and 0 without a GPU or driver */
/* Runs the node on `stream` (cudaStream_t, may be null). selected [B,Hkv,T,kmax] and
 * num_selected [B,Hkv,T] (device int32, optional) receive the region selection. */
int32_t gaze_forward(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_t* tensors,
                     void* workspace, uint64_t workspace_bytes, void* stream, int32_t* selected,
                     int32_t* num_selected);
/* Node v2: the tables come in (no slot index is built), present must alias past (else
 * GAZE_ERR_INVALID: no silent full-cache copy). selected [B,Hsel,T,kmax] and num_selected
 * [B,Hsel,T], Hsel = Hkv (routing kv_head) or Hq (query_head). stage_mask as below (7: all). */
int32_t gaze_forward_v2(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_v2_t* tensors,
                        void* workspace, uint64_t workspace_bytes, void* stream, int32_t* selected,
                        int32_t* num_selected, int32_t stage_mask);
/* gaze_forward running only some stages (benchmarks): bit 1 KV write + slot index, bit 2
 * region selection, bit 4 attention; 7 = gaze_forward. */
int32_t gaze_forward_stages(const gaze_problem_t* problem, const gaze_attrs_t* attrs, const gaze_tensors_t* tensors,
                            void* workspace, uint64_t workspace_bytes, void* stream, int32_t stage_mask);
/* Synchronizes `stream` and reads the device error flags of the last forward on `workspace`. */
int32_t gaze_device_errors(const gaze_problem_t* problem, const void* workspace, void* stream, int32_t* flags);

#ifdef __cplusplus
}
#endif

#endif /* GAZE_CAPI_H_ */
