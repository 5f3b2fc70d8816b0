// TensorRT glue for GazeAttention: see gaze_attention_plugin.h. Loaded with
// `trtexec --dynamicPlugins=libgaze_trt_plugin.so` or IPluginRegistry::loadLibrary, which call
// getCreators() below (the library does not also self-register, so loading it twice is harmless).
#include "gaze_attention_plugin.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <string>

#include "../kernels/gaze_kernels.h"

namespace gaze {
namespace trt {
namespace {

nvinfer1::ILoggerFinder* g_logger_finder = nullptr;

void log_error(const std::string& msg) {
  const std::string text = std::string("GazeAttention plugin: ") + msg;
  nvinfer1::ILogger* logger = g_logger_finder ? g_logger_finder->findLogger() : nullptr;
  if (logger) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, text.c_str());
  } else {
    std::fprintf(stderr, "%s\n", text.c_str());
  }
}

DType to_dtype(nvinfer1::DataType t) { return static_cast<DType>(static_cast<int32_t>(t)); }

TensorDesc to_desc(const nvinfer1::PluginTensorDesc& d) {
  TensorDesc t;
  t.dtype = to_dtype(d.type);
  t.nb_dims = d.dims.nbDims;
  for (int i = 0; i < d.dims.nbDims && i < kMaxDims; ++i) t.dims[i] = d.dims.d[i];
  return t;
}

TensorDesc to_desc(const nvinfer1::PluginTensorDesc& d, const nvinfer1::Dims& dims) {
  TensorDesc t = to_desc(d);
  t.nb_dims = dims.nbDims;
  for (int i = 0; i < dims.nbDims && i < kMaxDims; ++i) t.dims[i] = dims.d[i];
  return t;
}

constexpr int kNumIO = v2::kNumInputs + kNumOutputs;
const char* const kExpects = "expects 16 inputs and 4 outputs (GazeAttention node v2)";

// The v1 view (11 inputs) of the 16 v2 inputs: problem_from_inputs works on it.
std::vector<TensorDesc> v1_view(const std::vector<TensorDesc>& in) {
  static const int from[kNumInputs] = {v2::kQuery, v2::kKey, v2::kValue, v2::kPastKey, v2::kPastValue,
                                       v2::kPastDesc, v2::kSlotPos, v2::kSlotRegion, v2::kSlotValid,
                                       v2::kGaze, v2::kWriteOffset};
  std::vector<TensorDesc> v1(kNumInputs);
  for (int i = 0; i < kNumInputs; ++i) v1[i] = in[from[i]];
  return v1;
}

// Rules of node v2, then the launch problem.
Problem v2_problem(const std::vector<TensorDesc>& in, const Attributes& attrs) {
  infer_outputs_v2(in.data(), v2::kNumInputs, attrs);
  return problem_from_inputs(v1_view(in).data(), kNumInputs, attrs);
}

nvinfer1::PluginField field(const char* name, const void* data, nvinfer1::PluginFieldType type, int32_t length) {
  return nvinfer1::PluginField(name, data, type, length);
}

}  // namespace

GazeAttentionPlugin::GazeAttentionPlugin(const Attributes& attrs) : attrs_(attrs) { build_fields(); }

GazeAttentionPlugin::GazeAttentionPlugin(const GazeAttentionPlugin& other)
    : attrs_(other.attrs_), num_sms_(other.num_sms_) {
  build_fields();  // field pointers must point into this object
}

void GazeAttentionPlugin::build_fields() {
  fields_ = {field("top_k", &attrs_.top_k, nvinfer1::PluginFieldType::kINT32, 1),
             field("max_region_tokens", &attrs_.max_region_tokens, nvinfer1::PluginFieldType::kINT32, 1),
             field("scale", &attrs_.scale, nvinfer1::PluginFieldType::kFLOAT32, 1),
             field("routing", &attrs_.routing, nvinfer1::PluginFieldType::kINT32, 1),
             field("context_attention", &attrs_.context_attention, nvinfer1::PluginFieldType::kINT32, 1)};
  field_collection_.nbFields = static_cast<int32_t>(fields_.size());
  field_collection_.fields = fields_.data();
}

nvinfer1::IPluginCapability* GazeAttentionPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<BuildInterface*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* GazeAttentionPlugin::clone() noexcept {
  try {
    return new GazeAttentionPlugin(*this);
  } catch (const std::exception& e) {
    log_error(e.what());
    return nullptr;
  }
}

int32_t GazeAttentionPlugin::getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                                                const nvinfer1::DataType* input_types,
                                                int32_t nb_inputs) const noexcept {
  if (nb_outputs != kNumOutputs || nb_inputs != v2::kNumInputs) {
    log_error(kExpects);
    return -1;
  }
  if (!supports_io_dtype_v2(v2::kQuery, to_dtype(input_types[v2::kQuery]), to_dtype(input_types[v2::kQuery]))) {
    log_error("query dtype must be float32, float16 or bfloat16");
    return -1;
  }
  for (int i = 0; i < kNumOutputs; ++i) output_types[i] = input_types[v2::kOutputSource[i]];
  return 0;
}

int32_t GazeAttentionPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                             const nvinfer1::DimsExprs* /*shape_inputs*/, int32_t /*nb_shape_inputs*/,
                                             nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                                             nvinfer1::IExprBuilder& /*expr_builder*/) noexcept {
  if (nb_outputs != kNumOutputs || nb_inputs != v2::kNumInputs) {
    log_error(kExpects);
    return -1;
  }
  // Validate what is known now (constant dims); dtypes are checked in configurePlugin.
  try {
    std::vector<TensorDesc> in(v2::kNumInputs);
    for (int i = 0; i < v2::kNumInputs; ++i) {
      in[i].nb_dims = inputs[i].nbDims;
      for (int j = 0; j < inputs[i].nbDims && j < kMaxDims; ++j)
        in[i].dims[j] = inputs[i].d[j]->isConstant() ? inputs[i].d[j]->getConstantValue() : -1;
    }
    const DType probe_types[v2::kNumInputs] = {
        DType::kF16, DType::kF16, DType::kF16, DType::kF16, DType::kF16, DType::kF32, DType::kI64, DType::kI64,
        DType::kBool, DType::kI64, DType::kI64, DType::kBool, DType::kI64, DType::kI64, DType::kI64, DType::kI64};
    // Head-dim support is the same for every float dtype: probe with fp16 (dtypes: configurePlugin).
    for (int i = 0; i < v2::kNumInputs; ++i) in[i].dtype = probe_types[i];
    infer_outputs_v2(in.data(), v2::kNumInputs, attrs_);
  } catch (const std::exception& e) {
    log_error(e.what());
    return -1;
  }
  for (int i = 0; i < kNumOutputs; ++i) outputs[i] = inputs[v2::kOutputSource[i]];
  return 0;
}

bool GazeAttentionPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                                    int32_t nb_inputs, int32_t nb_outputs) noexcept {
  if (nb_inputs != v2::kNumInputs || nb_outputs != kNumOutputs || pos < 0 || pos >= kNumIO) return false;
  const auto& d = in_out[pos].desc;
  return d.format == nvinfer1::TensorFormat::kLINEAR &&
         supports_io_dtype_v2(pos, to_dtype(d.type), to_dtype(in_out[v2::kQuery].desc.type));
}

int32_t GazeAttentionPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                             const nvinfer1::DynamicPluginTensorDesc* /*out*/,
                                             int32_t nb_outputs) noexcept {
  try {
    if (nb_inputs != v2::kNumInputs || nb_outputs != kNumOutputs) throw Error(Error::kInvalid, kExpects);
    std::vector<TensorDesc> d(v2::kNumInputs), hi(v2::kNumInputs);
    for (int i = 0; i < v2::kNumInputs; ++i) {
      d[i] = to_desc(in[i].desc);
      hi[i] = to_desc(in[i].desc, in[i].max);
    }
    infer_outputs_v2(d.data(), v2::kNumInputs, attrs_);
    v2_problem(hi, attrs_);  // the profile's largest shape is served
    return 0;
  } catch (const std::exception& e) {
    log_error(e.what());
    return -1;
  }
}

size_t GazeAttentionPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                             const nvinfer1::DynamicPluginTensorDesc* /*outputs*/,
                                             int32_t /*nb_outputs*/) const noexcept {
  try {
    if (nb_inputs != v2::kNumInputs) throw Error(Error::kInvalid, kExpects);
    std::vector<TensorDesc> hi(nb_inputs);
    for (int i = 0; i < nb_inputs; ++i) hi[i] = to_desc(inputs[i].desc, inputs[i].max);
    return workspace_size_v2(v2_problem(hi, attrs_));
  } catch (const std::exception& e) {
    log_error(e.what());
    return 0;  // configurePlugin has already rejected such a profile
  }
}

// Outputs 1, 2, 3 (present_key, present_value, present_desc) alias inputs 3, 4, 5 (past_*):
// TensorRT binds one buffer to both and the kernels update the cache in place.
int32_t GazeAttentionPlugin::getAliasedInput(int32_t output_index) noexcept {
  return output_index >= 1 && output_index <= 3 ? v2::kPastKey + (output_index - 1) : -1;
}

int32_t GazeAttentionPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                                           const nvinfer1::PluginTensorDesc* /*out*/, int32_t /*nb_outputs*/) noexcept {
  try {
    if (nb_inputs != v2::kNumInputs) throw Error(Error::kInvalid, kExpects);
    std::vector<TensorDesc> d(nb_inputs);
    for (int i = 0; i < nb_inputs; ++i) d[i] = to_desc(in[i]);
    v2_problem(d, attrs_);
    return 0;
  } catch (const std::exception& e) {
    log_error(e.what());
    return -1;
  }
}

int32_t GazeAttentionPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                                     const nvinfer1::PluginTensorDesc* /*output_desc*/, const void* const* inputs,
                                     void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  try {
    std::vector<TensorDesc> d(v2::kNumInputs);
    for (int i = 0; i < v2::kNumInputs; ++i) d[i] = to_desc(input_desc[i]);
    const Problem p = v2_problem(d, attrs_);
    // In place only: present_* are aliases of past_* (getAliasedInput); never copy silently.
    for (int o = 1; o <= 3; ++o)
      if (outputs[o] != inputs[v2::kPastKey + (o - 1)])
        throw Error(Error::kInvalid, "output " + std::to_string(o) + " (present_*) is not bound to the same buffer "
                                     "as input " + std::to_string(v2::kPastKey + (o - 1)) +
                                     " (past_*): the KV cache is updated in place only");
    if (num_sms_ == 0) {
      int device = 0;
      if (cudaGetDevice(&device) != cudaSuccess ||
          cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        num_sms_ = 1;
    }
    Tensors x{inputs[v2::kQuery], inputs[v2::kKey], inputs[v2::kValue], inputs[v2::kPastKey],
              inputs[v2::kPastValue], static_cast<const float*>(inputs[v2::kPastDesc]),
              static_cast<const int64_t*>(inputs[v2::kSlotPos]), static_cast<const int64_t*>(inputs[v2::kSlotRegion]),
              static_cast<const uint8_t*>(inputs[v2::kSlotValid]), static_cast<const uint8_t*>(inputs[v2::kGaze]),
              static_cast<const int64_t*>(inputs[v2::kWriteOffset]), outputs[0], outputs[1], outputs[2],
              static_cast<float*>(outputs[3])};
    // Node v2 tables (as gaze_forward_v2 fills them): with dense_slots set the kernels use them.
    x.slot_image = static_cast<const int64_t*>(inputs[v2::kSlotImage]);
    x.dense_slots = static_cast<const int64_t*>(inputs[v2::kDenseSlots]);
    x.region_slots = static_cast<const int64_t*>(inputs[v2::kRegionSlots]);
    x.region_count = static_cast<const int64_t*>(inputs[v2::kRegionCount]);
    x.region_last = static_cast<const int64_t*>(inputs[v2::kRegionLast]);
    x.dense_len = input_desc[v2::kDenseSlots].dims.d[1];
    if (x.dense_slots == nullptr) throw Error(Error::kInvalid, "dense_slots is null");
    // TensorRT sized the workspace with getWorkspaceSize at the profile's max shape, which
    // covers this shape (workspace_size_v2 is monotone, gaze_kernels.h).
    const cudaError_t err = forward(p, attrs_, x, workspace, workspace_size_v2(p), num_sms_, stream);
    if (err != cudaSuccess) {
      log_error(std::string("CUDA launch failed: ") + cudaGetErrorString(err));
      return -1;
    }
    return 0;
  } catch (const std::exception& e) {
    log_error(e.what());
    return -1;
  }
}

nvinfer1::IPluginV3* GazeAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();
}

const nvinfer1::PluginFieldCollection* GazeAttentionPlugin::getFieldsToSerialize() noexcept {
  build_fields();
  return &field_collection_;
}

GazeAttentionCreator::GazeAttentionCreator() {
  fields_ = {field("top_k", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
             field("max_region_tokens", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
             field("scale", nullptr, nvinfer1::PluginFieldType::kFLOAT32, 1),
             field("routing", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
             field("context_attention", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
             field("plugin_namespace", nullptr, nvinfer1::PluginFieldType::kCHAR, 0),
             field("plugin_version", nullptr, nvinfer1::PluginFieldType::kCHAR, 0)};
  field_collection_.nbFields = static_cast<int32_t>(fields_.size());
  field_collection_.fields = fields_.data();
}

nvinfer1::IPluginV3* GazeAttentionCreator::createPlugin(const char* /*name*/, const nvinfer1::PluginFieldCollection* fc,
                                                        nvinfer1::TensorRTPhase /*phase*/) noexcept {
  try {
    if (fc == nullptr) throw Error(Error::kInvalid, "no attributes (PluginFieldCollection is null)");
    std::vector<Field> fields(fc->nbFields);
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      const nvinfer1::PluginField& f = fc->fields[i];
      fields[i] = Field{f.name, f.data, static_cast<FieldType>(static_cast<int32_t>(f.type)), f.length};
    }
    return new GazeAttentionPlugin(parse_attributes(fields.data(), fc->nbFields));
  } catch (const std::exception& e) {
    log_error(e.what());
    return nullptr;
  }
}

}  // namespace trt
}  // namespace gaze

extern "C" {

// Entry points IPluginRegistry::loadLibrary / trtexec --dynamicPlugins look up.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { gaze::trt::g_logger_finder = finder; }

nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nb_creators) {
  static gaze::trt::GazeAttentionCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nb_creators = 1;
  return creators;
}

}  // extern "C"
