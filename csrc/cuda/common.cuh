// Helpers shared by every csrc/cuda family. The device part is NVRTC-clean (no host headers), so
// a .cu file that includes it still compiles through CuPy; host helpers sit under
// #ifndef __CUDACC_RTC__. Accumulation type A: float32, float64 for float64 storage.
#pragma once
#ifndef GETFAST_NO_HALF
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace getfast {

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ double ld(double x) { return x; }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(double* p, double v) { *p = v; }
#ifndef GETFAST_NO_HALF
__device__ __forceinline__ float ld(__half x) { return __half2float(x); }
__device__ __forceinline__ float ld(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; the result is valid in thread 0. `sh` has 32 slots.
template <typename A>
__device__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  A r = A(0);
  if (w == 0) r = warp_sum(lane < int(blockDim.x >> 5) ? sh[lane] : A(0));
  return r;
}

template <typename A>
__device__ __forceinline__ bool finite(A v) {
  return v == v && v - v == A(0);
}

template <typename A>
__device__ __forceinline__ A inf_of() {
  return A(1e300) * A(1e300);
}

}  // namespace getfast

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <algorithm>

#include "../ops.h"

namespace getfast {

// Calls f(T{}, A{}) with the storage and accumulation types of the dtype code.
template <typename F>
const char* by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{}, float{});
    case 1: return f(double{}, double{});
    case 2: return f(__half{}, float{});
    case 3: return f(__nv_bfloat16{}, float{});
    default: return "unknown dtype code";
  }
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline const char* launched() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace getfast
#endif
