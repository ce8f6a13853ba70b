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

// The solvers' per-sample residual bookkeeping after one function evaluation (one thread per sample b; the same
// rules as cpu::residual_bookkeeping and the Triton helper): abs/rel residual from the squared norms, the trace
// column k (frozen samples repeat their lowest, non-finite ones inf), the running minima and the 1-based step of
// the stop-mode minimum, and the status (0 running, 1 converged below tol, 2 non-finite). Returns the new status;
// *improved says whether this iterate is the new stop-mode best.
template <typename A>
__device__ __forceinline__ int residual_bookkeeping(A sq_res, A sq_f, A* lowest, A* trace, int* status, long long b,
                                                    long long B, long long T, long long k, A tol, int stop_rel, A eps,
                                                    bool* improved) {
  const A inf = inf_of<A>();
  A abs_r = sqrt(sq_res);
  const A f_norm = sqrt(sq_f);
  const bool fin = finite(abs_r) && finite(f_norm);
  const A rel_r = fin ? abs_r / (f_norm + eps) : inf;
  if (!fin) abs_r = inf;
  const int st0 = status[b];
  trace[b * T + k] = st0 == 0 ? abs_r : (st0 == 1 ? lowest[b] : inf);
  trace[(B + b) * T + k] = st0 == 0 ? rel_r : (st0 == 1 ? lowest[B + b] : inf);
  int st1 = st0;
  *improved = false;
  if (st0 == 0) {
    *improved = stop_rel ? rel_r < lowest[B + b] : abs_r < lowest[b];
    lowest[b] = abs_r < lowest[b] ? abs_r : lowest[b];
    lowest[B + b] = rel_r < lowest[B + b] ? rel_r : lowest[B + b];
    if (*improved) lowest[2 * B + b] = A(k + 1);
    if (!fin) st1 = 2;
    else if ((stop_rel ? lowest[B + b] : lowest[b]) < tol) st1 = 1;  // tol < 0: never
    status[b] = st1;
  }
  return st1;
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
