// Kernels that exercise the CPU harness itself (tests/test_cpu_harness.py), written as CUDA and
// launched with GAZE_LAUNCH like the gaze kernels. Each gaze_selftest_* entry point launches one
// kernel on host memory and returns the cudaError_t of cudaGetLastError() (0: success); the
// failure text is copied into `err`.
#include <cstdint>
#include <cstring>

#include "../kernels/gaze_common.cuh"

namespace {

constexpr int kBlock = 128;

// Reverses each block's slice through shared memory; `sync` = 0 drops the barrier (a race).
__global__ void reverse_kernel(const int* in, int* out, int sync) {
  __shared__ int s[kBlock];
  const int base = blockIdx.x * kBlock, t = threadIdx.x;
  s[t] = in[base + t];
  if (sync) __syncthreads();
  out[base + t] = s[kBlock - 1 - t];
}

// One warp per 32 outputs: out[0] butterfly sum, [1] inclusive scan (shfl_up), [2] shfl_down by 3,
// [3] broadcast of lane 5, [4] xor 1 within segments of 8, [5] shfl_up by 2 within segments of 8.
__global__ void shuffle_kernel(const float* in, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float v = in[warp * 32 + lane];
  float sum = v;
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  float scan = v;
  for (int off = 1; off < 32; off <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, scan, off);
    if (lane >= off) scan += n;
  }
  float* o = out + (warp * 6) * 32;
  o[0 * 32 + lane] = sum;
  o[1 * 32 + lane] = scan;
  o[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3 * 32 + lane] = __shfl_sync(0xffffffffu, v, 5);
  o[4 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
  o[5 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 2, 8);
}

// Shuffles over half a warp with a half mask: legal, the other half does something else.
__global__ void half_warp_kernel(const float* in, float* out) {
  const int lane = threadIdx.x & 31;
  float v = in[lane];
  if (lane < 16) {
    for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, off);
  } else {
    v = -v;
  }
  __syncwarp();
  out[lane] = v;
}

// Broken on purpose, one way per `mode`:
//   1 a full-mask shuffle inside a branch only lanes < 16 take;
//   2 lanes < 16 leave early while the others shuffle with a full mask;
//   3 threads of one block wait at two different __syncthreads;
//   4 a lane goes to __syncthreads while the rest of its warp waits for it in a shuffle;
//   5 a mask that names a lane past the end of a 40-thread block;
//   6 lanes read (shfl idx) from a lane outside the mask;
//   7 the two halves of a warp wait at two different full-mask shuffles (a deadlock).
__global__ void broken_kernel(float* out, int mode) {
  const int t = threadIdx.x, lane = t & 31;
  float v = float(t);
  switch (mode) {
    case 1:
      if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 2:
      if (lane < 16) return;
      v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 3:
      if (t < 64) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 4:
      if (lane == 7) {
        __syncthreads();
      } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
        __syncthreads();
      }
      break;
    case 5:
      v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 6:
      if (lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);
      break;
    case 7:
      if (lane < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      } else {
        v = __shfl_xor_sync(0xffffffffu, v, 2);
      }
      break;
    default:
      break;
  }
  out[t] = v;
}

// Order in which blocks and threads start: `seq` counts arrivals.
__global__ void order_kernel(int* seq, int* block_order, int* thread_order) {
  if (threadIdx.x == 0) block_order[atomicAdd(seq, 1)] = blockIdx.x;
  thread_order[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(seq + 1, 1);
}

// Shared memory as the block finds it (before any write).
__global__ void poison_kernel(uint32_t* out) {
  __shared__ uint32_t s[32];
  out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = 0x12345678u;  // a block that saw a previous block's value would read this
}

// Real atomics from every thread of every block.
__global__ void atomic_kernel(int* count, float* sum, unsigned* bits, long long* maxv) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(count, 1);
  atomicAdd(sum, 0.5f);
  atomicOr(bits, 1u << (i % 32));
  atomicMax(maxv, static_cast<long long>(i) * 3);
}

// Thread 37 writes through a null pointer (a GPU reports an illegal address).
__global__ void fault_kernel(int* out) {
  int* p = threadIdx.x == 37 ? nullptr : out;
  p[threadIdx.x] = 1;
}

__global__ void spin_kernel(volatile int* flag) {
  while (*flag == 0) {
  }
}

int32_t finish(char* err, int32_t errlen) {
  const cudaError_t e = cudaGetLastError();
  if (err && errlen > 0) {
    std::strncpy(err, e == cudaSuccess ? "" : cudaGetErrorString(e), static_cast<size_t>(errlen) - 1);
    err[errlen - 1] = 0;
  }
  return static_cast<int32_t>(e);
}

}  // namespace

extern "C" {

int32_t gaze_selftest_reverse(const int* in, int* out, int32_t blocks, int32_t sync, char* err, int32_t errlen) {
  GAZE_LAUNCH(blocks, kBlock, 0, nullptr, reverse_kernel)(in, out, sync);
  return finish(err, errlen);
}

int32_t gaze_selftest_shuffle(const float* in, float* out, int32_t warps, char* err, int32_t errlen) {
  GAZE_LAUNCH(1, warps * 32, 0, nullptr, shuffle_kernel)(in, out);
  return finish(err, errlen);
}

int32_t gaze_selftest_half_warp(const float* in, float* out, char* err, int32_t errlen) {
  GAZE_LAUNCH(1, 32, 0, nullptr, half_warp_kernel)(in, out);
  return finish(err, errlen);
}

int32_t gaze_selftest_broken(float* out, int32_t mode, char* err, int32_t errlen) {
  GAZE_LAUNCH(1, mode == 5 ? 40 : 128, 0, nullptr, broken_kernel)(out, mode);
  return finish(err, errlen);
}

int32_t gaze_selftest_order(int* seq, int* block_order, int* thread_order, int32_t blocks, int32_t threads,
                            char* err, int32_t errlen) {
  GAZE_LAUNCH(blocks, threads, 0, nullptr, order_kernel)(seq, block_order, thread_order);
  return finish(err, errlen);
}

int32_t gaze_selftest_poison(uint32_t* out, int32_t blocks, char* err, int32_t errlen) {
  GAZE_LAUNCH(blocks, 32, 0, nullptr, poison_kernel)(out);
  return finish(err, errlen);
}

int32_t gaze_selftest_atomics(int* count, float* sum, unsigned* bits, long long* maxv, int32_t blocks,
                              int32_t threads, char* err, int32_t errlen) {
  GAZE_LAUNCH(blocks, threads, 0, nullptr, atomic_kernel)(count, sum, bits, maxv);
  return finish(err, errlen);
}

// A launch the harness must refuse (block too large, or an empty grid), like a GPU.
int32_t gaze_selftest_bad_config(int32_t threads, int32_t blocks, int* seq, char* err, int32_t errlen) {
  GAZE_LAUNCH(blocks, threads, 0, nullptr, order_kernel)(seq, seq, seq);
  return finish(err, errlen);
}

int32_t gaze_selftest_fault(int* out, char* err, int32_t errlen) {
  GAZE_LAUNCH(2, 64, 0, nullptr, fault_kernel)(out);
  return finish(err, errlen);
}

// Never returns unless *flag is set: the watchdog's test runs it in a child process.
int32_t gaze_selftest_spin(int* flag, char* err, int32_t errlen) {
  GAZE_LAUNCH(1, 1, 0, nullptr, spin_kernel)(flag);
  return finish(err, errlen);
}

}  // extern "C"
