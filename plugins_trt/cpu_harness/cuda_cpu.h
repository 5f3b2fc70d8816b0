// CPU execution harness for the CUDA kernels in plugins_trt/kernels: force-included
// (g++ -x c++ -include cuda_cpu.h) so that the SAME .cu source nvcc compiles builds as C++
// and runs on the CPU. What it maps, and why (details: docs/KERNELS.md, "CPU harness"):
//
//   - Types and host conversions (dim3, uint3, uint4, float2, __half, __nv_bfloat16, ...)
//     come from the real CUDA toolkit headers, so rounding is the toolkit's own.
//   - Every CUDA thread of a block is a fiber (ucontext, harness.cpp); blocks run one after
//     another on the calling OS thread, in an order shuffled by the scheduling seed.
//   - __shared__ variables become function-local statics: one block runs at a time, so a
//     static IS that block's shared memory. shared.ld gathers the zero-initialised statics
//     of every .cu object (nothing else lives there: tests/test_cpu_harness.py checks) into
//     one section that the harness poisons before every block, so a read before the block's
//     first write sees garbage, as on a GPU. File-scope __device__ variables are therefore
//     not supported (the kernels have none).
//   - __syncthreads() is a barrier over the block's live threads; warp shuffles and
//     __syncwarp are an exchange among the lanes named in the mask that requires every one
//     of them to arrive at the same call; anything else is reported as divergence, and a
//     block whose threads all wait is reported as a deadlock (both as a launch failure).
//   - Atomics are real atomics (__atomic builtins); the CUDA runtime calls the kernels'
//     host code makes (memcpy/memset, errors, device queries) run on host memory.
#pragma once

#if defined(__CUDACC__)
#error "cuda_cpu.h is the CPU harness: compile the kernels with g++ -x c++, not with nvcc"
#endif

#define GAZE_CPU_HARNESS 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Under a host compiler the toolkit headers define __global__, __device__, __host__ and
// __shared__ as nothing and leave __launch_bounds__ undefined. (A section attribute would be
// neater than shared.ld, but g++ ignores it on statics of function templates.)
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#ifndef warpSize
#define warpSize 32
#endif

namespace gaze_cpu {

// What one CUDA thread sees; `index` is its linear thread index in the block.
struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int index;
};

extern ThreadCtx* g_thread;  // the thread (fiber) running now; set by the scheduler

enum WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp };

void syncthreads(const char* file, int line);
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);

// Kernel launch: runs `body(ctx)` once per thread of every block (see harness.cpp).
void run_grid(const char* name, const char* site, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
              void (*body)(void*), void* ctx);

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_exchange(kSyncWarp, mask, 0, 0, 32, file, line);
}

template <typename T>
T shfl(WarpOp op, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
  return from_bits<T>(warp_exchange(op, mask, to_bits(v), arg, width, file, line));
}

// Kernel parameters are converted once into a tuple, like CUDA's parameter buffer; every
// thread then calls the kernel with its own by-value copies.
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  const char* name;
  const char* site;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(name, site, grid, block, shared_bytes, stream,
             [](void* c) {
               Call* self = static_cast<Call*>(c);
               std::apply(self->kernel, self->params);
             },
             &call);
  }
};

template <typename... P>
Launcher<P...> launcher(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, const char* name,
                        const char* site, void (*kernel)(P...)) {
  return Launcher<P...>{kernel, grid, block, shared_bytes, stream, name, site};
}

}  // namespace gaze_cpu

// GAZE_LAUNCH(grid, block, shared_bytes, stream, kernel<...>)(args...): nvcc spells it
// kernel<<<grid, block, shared_bytes, stream>>>(args...) (plugins_trt/kernels/gaze_common.cuh).
// __PRETTY_FUNCTION__ of the launching function says what T, kD, ... are there (reports).
#define GAZE_LAUNCH(grid, block, smem, stream, ...) \
  ::gaze_cpu::launcher(grid, block, smem, stream, #__VA_ARGS__, __PRETTY_FUNCTION__, &__VA_ARGS__)

#define threadIdx (::gaze_cpu::g_thread->thread_idx)
#define blockIdx (::gaze_cpu::g_thread->block_idx)
#define blockDim (::gaze_cpu::g_thread->block_dim)
#define gridDim (::gaze_cpu::g_thread->grid_dim)

// The call site goes with every barrier and warp operation: threads of a block must meet at
// the same one, and reports name it.
#define __syncthreads() ::gaze_cpu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::gaze_cpu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::gaze_cpu::shfl(::gaze_cpu::kShflIdx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::gaze_cpu::shfl(::gaze_cpu::kShflUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::gaze_cpu::shfl(::gaze_cpu::kShflDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::gaze_cpu::shfl(::gaze_cpu::kShflXor, __FILE__, __LINE__, __VA_ARGS__)

// ---- device functions the kernels use, on the host -------------------------------------------

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline unsigned __float_as_uint(float f) { return ::gaze_cpu::from_bits<unsigned>(::gaze_cpu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::gaze_cpu::from_bits<float>(::gaze_cpu::to_bits(u)); }
inline int __float_as_int(float f) { return ::gaze_cpu::from_bits<int>(::gaze_cpu::to_bits(f)); }
inline float __int_as_float(int i) { return ::gaze_cpu::from_bits<float>(::gaze_cpu::to_bits(i)); }
// The GPU build uses --use_fast_math (approximate exp2); the CPU's expf is more accurate, and
// the tests' tolerances cover both.
inline float __expf(float x) { return std::exp(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// Real atomics (sequentially consistent); they return the old value, as CUDA's do. The value
// argument is not deduced, so an int constant converts to the pointee type as with CUDA's overloads.
template <typename T>
using Same = typename std::common_type<T>::type;
template <typename T>
inline T atomicAdd(T* p, Same<T> v) {
  if constexpr (std::is_floating_point<T>::value) {  // compare-and-swap loop, as CUDA documents for sm < 60
    T old;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    T sum = old + v;
    while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) sum = old + v;
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <typename T>
inline T atomicOr(T* p, Same<T> v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicAnd(T* p, Same<T> v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicExch(T* p, Same<T> v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicCAS(T* p, Same<T> expected, Same<T> desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
template <typename T>
inline T atomicMax(T* p, Same<T> v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, Same<T> v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
