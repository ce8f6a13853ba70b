// Broyden low-rank inverse-Jacobian products on CUDA (Broyden 1965; Bai et al. 2019). Contract
// and reference: getfast/ops/broyden.py. One kernel pair serves both products:
//   out_b = -x_b + sum_{j<n} Bm[j, b] <A[j, b], x_b>
// ((A, Bm) = (V, U) for (-I + U V^T) x, (U, V) for x^T (-I + U V^T)).
//   broyden_dots_<t>    grid (nblk, B): partial <A_j, x> over the block's chunk -> work[b][blk][j]
//   broyden_expand_<t>  grid (nblk, B): sums the nblk partials of its sample (deterministic order)
//                       into shared memory, then out = -x + sum_j c_j Bm_j over its chunk.
// The device part is NVRTC-clean (extern "C" kernels, no host headers); host launcher at the end.
// Accumulation: float32 (float64 for float64 inputs).
#ifndef GETFAST_NO_HALF
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define BROYDEN_THREADS 256
#define BROYDEN_SMEM_N 1024  // coefficients cached in shared memory; larger n reads them from work

namespace getfast_broyden {

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

template <typename A>
__device__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  A r = A(0);
  if (w == 0) {
    r = lane < int(blockDim.x >> 5) ? sh[lane] : A(0);
    r = warp_sum(r);
  }
  return r;
}

template <typename T, typename A>
__device__ void dots_impl(const T* __restrict__ Am, const T* __restrict__ x, A* __restrict__ work,
                          long long n, long long B, long long D, long long chunk) {
  __shared__ A sh[32];
  const long long b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x;
  const long long start = blk * chunk;
  const long long end = start + chunk < D ? start + chunk : D;
  const T* xb = x + b * D;
  for (long long j = 0; j < n; ++j) {
    const T* aj = Am + (j * B + b) * D;
    A acc = A(0);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) acc += ld(aj[i]) * ld(xb[i]);
    const A r = block_sum(acc, sh);
    if (threadIdx.x == 0) work[(b * nblk + blk) * n + j] = r;
  }
}

template <typename T, typename A>
__device__ void expand_impl(const T* __restrict__ Bm, const T* __restrict__ x, T* __restrict__ out,
                            const A* __restrict__ work, long long n, long long B, long long D,
                            long long chunk) {
  __shared__ A c[BROYDEN_SMEM_N];
  const long long b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x;
  const long long nc = n < BROYDEN_SMEM_N ? n : BROYDEN_SMEM_N;
  for (long long j = threadIdx.x; j < nc; j += blockDim.x) {
    A acc = A(0);
    for (long long q = 0; q < nblk; ++q) acc += work[(b * nblk + q) * n + j];
    c[j] = acc;
  }
  __syncthreads();
  const long long start = blk * chunk;
  const long long end = start + chunk < D ? start + chunk : D;
  const T* xb = x + b * D;
  T* ob = out + b * D;
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    A acc = -ld(xb[i]);
    for (long long j = 0; j < n; ++j) {
      A cj;
      if (j < nc) {
        cj = c[j];
      } else {
        cj = A(0);
        for (long long q = 0; q < nblk; ++q) cj += work[(b * nblk + q) * n + j];
      }
      acc += cj * ld(Bm[(j * B + b) * D + i]);
    }
    st(ob + i, acc);
  }
}

}  // namespace getfast_broyden

#define GETFAST_BROYDEN_KERNELS(SFX, T, A)                                                         \
  extern "C" __global__ void __launch_bounds__(BROYDEN_THREADS)                                  \
      broyden_dots_##SFX(const T* Am, const T* x, A* work, long long n, long long B, long long D, \
                         long long chunk) {                                                       \
    getfast_broyden::dots_impl<T, A>(Am, x, work, n, B, D, chunk);                                \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(BROYDEN_THREADS)                                  \
      broyden_expand_##SFX(const T* Bm, const T* x, T* out, const A* work, long long n,           \
                           long long B, long long D, long long chunk) {                           \
    getfast_broyden::expand_impl<T, A>(Bm, x, out, work, n, B, D, chunk);                         \
  }

GETFAST_BROYDEN_KERNELS(f32, float, float)
GETFAST_BROYDEN_KERNELS(f64, double, double)
#ifndef GETFAST_NO_HALF
GETFAST_BROYDEN_KERNELS(f16, __half, float)
GETFAST_BROYDEN_KERNELS(bf16, __nv_bfloat16, float)
#endif

// ---- host launcher (nvcc only) ----------------------------------------------------------
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <cstdint>

#include "broyden.h"

namespace getfast {
namespace {

template <typename T, typename A>
const char* launch(std::uintptr_t Am, std::uintptr_t Bm, std::uintptr_t x, std::uintptr_t out,
                   int64_t n, int64_t B, int64_t D, std::uintptr_t work, cudaStream_t st,
                   void (*dots)(const T*, const T*, A*, long long, long long, long long, long long),
                   void (*expand)(const T*, const T*, T*, const A*, long long, long long, long long,
                                  long long)) {
  if (B > 65535) return "batch larger than 65535 is not supported by the CUDA Broyden products";
  const int64_t nblk = broyden_blocks_per_sample(D);
  const int64_t chunk = (D + nblk - 1) / nblk;
  dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  if (n > 0)
    dots<<<grid, BROYDEN_THREADS, 0, st>>>(reinterpret_cast<const T*>(Am),
                                           reinterpret_cast<const T*>(x), reinterpret_cast<A*>(work),
                                           n, B, D, chunk);
  expand<<<grid, BROYDEN_THREADS, 0, st>>>(reinterpret_cast<const T*>(Bm),
                                           reinterpret_cast<const T*>(x), reinterpret_cast<T*>(out),
                                           reinterpret_cast<const A*>(work), n, B, D, chunk);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* broyden_lowrank_cuda(int dtype, std::uintptr_t Am, std::uintptr_t Bm, std::uintptr_t x,
                                 std::uintptr_t out, int64_t n, int64_t B, int64_t D,
                                 std::uintptr_t work, std::uintptr_t stream) {
  if (n < 0) return "n must be >= 0";
  if (B <= 0 || D <= 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch<float, float>(Am, Bm, x, out, n, B, D, work, st, broyden_dots_f32, broyden_expand_f32);
    case 1: return launch<double, double>(Am, Bm, x, out, n, B, D, work, st, broyden_dots_f64, broyden_expand_f64);
    case 2: return launch<__half, float>(Am, Bm, x, out, n, B, D, work, st, broyden_dots_f16, broyden_expand_f16);
    case 3: return launch<__nv_bfloat16, float>(Am, Bm, x, out, n, B, D, work, st, broyden_dots_bf16, broyden_expand_bf16);
    default: return "unknown dtype code";
  }
}

}  // namespace getfast
#endif  // __CUDACC_RTC__
