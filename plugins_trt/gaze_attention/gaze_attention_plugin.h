// TensorRT IPluginV3 glue for the gaze::GazeAttention node v2 (name "GazeAttention", version "2",
// namespace "gaze"; 16 inputs, 4 outputs, docs/ONNX_CONTRACT.md). All rules live in ../common/gaze_host.h and all GPU work in ../kernels:
// this file only translates TensorRT's types. Compiles only where TensorRT 10.x is installed.
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

#include "../common/gaze_host.h"

namespace gaze {
namespace trt {

// present_key/present_value/present_desc (outputs 1..3) are declared aliases of past_key/
// past_value/past_desc (inputs 3..5) through IPluginV3OneBuildV2::getAliasedInput (TensorRT >= 10.3):
// the KV cache is updated in place only, and enqueue refuses present != past.
using BuildInterface = nvinfer1::IPluginV3OneBuildV2;

class GazeAttentionPlugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public BuildInterface,
                            public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit GazeAttentionPlugin(const Attributes& attrs);
  GazeAttentionPlugin(const GazeAttentionPlugin& other);
  GazeAttentionPlugin& operator=(const GazeAttentionPlugin&) = delete;
  ~GazeAttentionPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out, int32_t nb_outputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types, int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs* shape_inputs,
                          int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return kNumOutputs; }
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs, int32_t nb_outputs) const noexcept override;
  int32_t getAliasedInput(int32_t output_index) noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc* out,
                        int32_t nb_outputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc* output_desc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

 private:
  void build_fields();

  Attributes attrs_;
  int num_sms_ = 0;  // queried on the first enqueue
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection field_collection_{};
};

class GazeAttentionCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  GazeAttentionCreator();
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &field_collection_; }
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection field_collection_{};
};

}  // namespace trt
}  // namespace gaze
