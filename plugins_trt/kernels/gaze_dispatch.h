// dtype x head-dim dispatch to kernel templates: the cases of gaze::dispatch_table(), nothing else.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "../common/gaze_host.h"

namespace gaze {

// Calls f(static_cast<T*>(nullptr), std::integral_constant<int, D>{}) for the supported case.
template <typename T, typename F>
void dispatch_head_dim(int head_dim, F&& f) {
  if (head_dim == 64) {
    f(static_cast<T*>(nullptr), std::integral_constant<int, 64>{});
  } else if (head_dim == 128) {
    f(static_cast<T*>(nullptr), std::integral_constant<int, 128>{});
  } else {
    throw Error(Error::kUnsupported, "no GazeAttention kernel for head dim " + std::to_string(head_dim) +
                                         " (supported: 64, 128)");
  }
}

template <typename F>
void dispatch(DType dtype, int head_dim, F&& f) {
  switch (dtype) {
    case DType::kF32: dispatch_head_dim<float>(head_dim, f); break;
    case DType::kF16: dispatch_head_dim<__half>(head_dim, f); break;
    case DType::kBF16: dispatch_head_dim<__nv_bfloat16>(head_dim, f); break;
    default:
      throw Error(Error::kUnsupported, std::string("no GazeAttention kernel for dtype ") + dtype_name(dtype));
  }
}

}  // namespace gaze
