// Device helpers shared by the gaze kernels: 16-byte vector loads/stores, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

// Kernel launch that nvcc and the CPU harness (plugins_trt/cpu_harness, which defines it
// first) both compile: GAZE_LAUNCH(grid, block, shared_bytes, stream, kernel<...>)(args...).
#ifndef GAZE_LAUNCH
#define GAZE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace gaze {
namespace dev {

// Elements of T in one 16-byte load.
template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);
};

__device__ __forceinline__ void load16(const float* p, float (&o)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
// The four 32-bit words of a 16-byte vector as pairs of 16-bit floats. Bit copies through the
// toolkit's *_raw structs, not a local uint4 read through __half2* (undefined behaviour in C++:
// g++ -O2 dropped the copy in the CPU harness build); on the GPU they are register moves.
__device__ __forceinline__ __half2 as_half2(uint32_t w) {
  __half2_raw r;
  memcpy(&r, &w, sizeof r);
  return __half2(r);
}
__device__ __forceinline__ __nv_bfloat162 as_bfloat162(uint32_t w) {
  __nv_bfloat162_raw r;
  memcpy(&r, &w, sizeof r);
  return __nv_bfloat162(r);
}
__device__ __forceinline__ void convert_halves(const uint4& raw, float (&o)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(as_half2(w[i]));
    o[2 * i] = f.x; o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void convert_bfloat16s(const uint4& raw, float (&o)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(as_bfloat162(w[i]));
    o[2 * i] = f.x; o[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load16(const __half* p, float (&o)[8]) {
  convert_halves(*reinterpret_cast<const uint4*>(p), o);
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float (&o)[8]) {
  convert_bfloat16s(*reinterpret_cast<const uint4*>(p), o);
}

// Raw 16-byte load, converted later (lets a loop issue several loads before using any).
__device__ __forceinline__ uint4 load_raw16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ void convert16(const uint4& raw, float (&o)[4]) {
  o[0] = __uint_as_float(raw.x); o[1] = __uint_as_float(raw.y);
  o[2] = __uint_as_float(raw.z); o[3] = __uint_as_float(raw.w);
}
template <typename T>
__device__ __forceinline__ void convert16(const uint4& raw, float (&o)[8]);
template <>
__device__ __forceinline__ void convert16<__half>(const uint4& raw, float (&o)[8]) {
  convert_halves(raw, o);
}
template <>
__device__ __forceinline__ void convert16<__nv_bfloat16>(const uint4& raw, float (&o)[8]) {
  convert_bfloat16s(raw, o);
}
// Dispatch on the element type: fp32 vectors have 4 elements, 16-bit ones 8.
template <typename T>
__device__ __forceinline__ void convert_vec(const uint4& raw, float (&o)[Vec<T>::kN]) {
  if constexpr (sizeof(T) == 4) {
    convert16(raw, o);
  } else {
    convert16<T>(raw, o);
  }
}

__device__ __forceinline__ void copy16(void* dst, const void* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Sum over `width` consecutive lanes (width a power of two <= 32); every lane gets the sum.
template <int kWidth>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = kWidth / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// exp(a - b) that is 0 for a = -inf (an empty partial), never NaN.
__device__ __forceinline__ float exp_diff(float a, float b) { return a == -INFINITY ? 0.f : __expf(a - b); }

// Query is valid and in range: its slot o + t lies in [0, S).
__device__ __forceinline__ bool query_slot(const int64_t* write_offset, int64_t t, int64_t S, int64_t* slot) {
  const int64_t s = *write_offset + t;
  *slot = s;
  return s >= 0 && s < S;
}

}  // namespace dev
}  // namespace gaze
