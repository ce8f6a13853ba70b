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


// ---- the fused Broyden iteration (getfast::broyden_step; math in getfast/ops/broyden.py) ----
// n = min(k-1, mem) live pairs, s = (k-1) % mem, P = 3 mem + 4 values per sample:
//   broyden_sdots_<t>    grid (nblk, B): partial a_j = <U_j, dx>, b_j = <V_j, dg>, c_j = <V_j, g>
//                        and |g|^2, |f|^2, <dx, dg>, <dx, g> over the block's chunk
//   broyden_sscal_<a>    grid (B), 32 threads: sums partials; bookkeeping; vT dg, vT g, the
//                        validity of the pair; coefficients to work
//   broyden_supdate_<t>  grid (nblk, B): new pair (u, v) into slot s, B g with the new memory,
//                        x -= B g (running samples), dx, g_prev, best. Each element is read and
//                        written by one thread (the ring slot s is read before it is replaced).
template <typename A>
__device__ __forceinline__ A inf_of(A) {
  return A(1e300) * A(1e300);
}

template <typename A>
__device__ __forceinline__ bool finite_(A v) {
  return v == v && v - v == A(0);
}

template <typename T, typename A>
__device__ __forceinline__ void residuals(const T* fb, const T* xb, const T* gpb, long long i, A& f,
                                          A& g, A& gs, A& dg) {
  T tmp;
  f = ld(fb[i]);
  g = f - ld(xb[i]);
  st(&tmp, g);
  gs = ld(tmp);
  dg = gs - ld(gpb[i]);
}

template <typename T, typename A>
__device__ void sdots_impl(const T* __restrict__ x, const T* __restrict__ fx,
                           const T* __restrict__ U, const T* __restrict__ V,
                           const T* __restrict__ gprev, const T* __restrict__ dx,
                           A* __restrict__ part, long long mem, long long B, long long D,
                           long long n, long long chunk) {
  __shared__ A sh[32];
  const long long b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x;
  const long long P = 3 * mem + 4;
  const long long start = blk * chunk;
  const long long end = start + chunk < D ? start + chunk : D;
  const T* xb = x + b * D;
  const T* fb = fx + b * D;
  const T* gpb = gprev + b * D;
  const T* dxb = dx + b * D;
  A* out = part + (b * nblk + blk) * P;
  A sg = A(0), sf = A(0), sxg = A(0), sxs = A(0);
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    A f, g, gs, dg;
    residuals<T, A>(fb, xb, gpb, i, f, g, gs, dg);
    const A d = ld(dxb[i]);
    sg += g * g;
    sf += f * f;
    sxg += d * dg;
    sxs += d * gs;
  }
  A r = block_sum(sg, sh);
  if (threadIdx.x == 0) out[3 * mem] = r;
  r = block_sum(sf, sh);
  if (threadIdx.x == 0) out[3 * mem + 1] = r;
  r = block_sum(sxg, sh);
  if (threadIdx.x == 0) out[3 * mem + 2] = r;
  r = block_sum(sxs, sh);
  if (threadIdx.x == 0) out[3 * mem + 3] = r;
  for (long long j = 0; j < n; ++j) {
    const T* uj = U + (j * B + b) * D;
    const T* vj = V + (j * B + b) * D;
    A pa = A(0), pb = A(0), pc = A(0);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
      A f, g, gs, dg;
      residuals<T, A>(fb, xb, gpb, i, f, g, gs, dg);
      const A vv = ld(vj[i]);
      pa += ld(uj[i]) * ld(dxb[i]);
      pb += vv * dg;
      pc += vv * gs;
    }
    r = block_sum(pa, sh);
    if (threadIdx.x == 0) out[j] = r;
    r = block_sum(pb, sh);
    if (threadIdx.x == 0) out[mem + j] = r;
    r = block_sum(pc, sh);
    if (threadIdx.x == 0) out[2 * mem + j] = r;
  }
}

template <typename A>
__device__ void sscal_impl(A* __restrict__ lowest, A* __restrict__ trace, int* __restrict__ status,
                           A* __restrict__ work, long long mem, long long B, long long T,
                           long long k, long long n, long long s, int full, long long nblk,
                           A tol, int stop_rel) {
  const long long b = blockIdx.x;
  const long long P = 3 * mem + 4;
  const A* part = work + b * nblk * P;
  A* coef = work + B * nblk * P + b * P;
  for (long long q = threadIdx.x; q < P; q += blockDim.x) {
    const bool live = (q % mem < n && q < 3 * mem) || q >= 3 * mem;
    A acc = A(0);
    if (live)
      for (long long p = 0; p < nblk; ++p) acc += part[p * P + q];
    coef[q] = acc;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const A inf = inf_of(A(0));
  A abs_r = sqrt(coef[3 * mem]);
  const A f_norm = sqrt(coef[3 * mem + 1]);
  const bool fin = finite_(abs_r) && finite_(f_norm);
  const A rel_r = fin ? abs_r / (f_norm + A(1e-9)) : inf;
  if (!fin) abs_r = inf;
  const int st0 = status[b];
  trace[b * T + k] = st0 == 0 ? abs_r : (st0 == 1 ? lowest[b] : inf);
  trace[(B + b) * T + k] = st0 == 0 ? rel_r : (st0 == 1 ? lowest[B + b] : inf);
  int st1 = st0;
  bool improved = false;
  if (st0 == 0) {
    improved = (stop_rel ? rel_r : abs_r) < (stop_rel ? lowest[B + b] : lowest[b]);
    lowest[b] = abs_r < lowest[b] ? abs_r : lowest[b];
    lowest[B + b] = rel_r < lowest[B + b] ? rel_r : lowest[B + b];
    if (improved) lowest[2 * B + b] = A(k + 1);
    const A new_lo = stop_rel ? lowest[B + b] : lowest[b];
    if (!fin) st1 = 2;
    else if (tol >= A(0) && new_lo < tol) st1 = 1;
    status[b] = st1;
  }
  bool ok = k > 0;
  A sab = A(0), sac = A(0);
  for (long long j = 0; j < n; ++j) {
    const A a = coef[j], bb = coef[mem + j], c = coef[2 * mem + j];
    ok = ok && finite_(a) && finite_(bb) && finite_(c);
    sab += a * bb;
    sac += a * c;
  }
  const A den = sab - coef[3 * mem + 2];
  const A vg = sac - coef[3 * mem + 3];
  ok = ok && finite_(den) && den != A(0) && finite_(vg);
  if (full) coef[2 * mem + s] = A(0);  // slot s leaves the memory
  coef[3 * mem] = ok ? A(1) / den : A(0);
  coef[3 * mem + 1] = ok ? vg : A(0);
  coef[3 * mem + 2] = A((st1 == 0 ? 1 : 0) + (improved ? 2 : 0) + (ok ? 4 : 0));
}

// No __restrict__ on x/fx: f may return its own input, so fx can alias x.
template <typename T, typename A>
__device__ void supdate_impl(T* x, const T* fx, T* U, T* V, T* gprev, T* dx, T* best,
                             const A* __restrict__ work, long long mem, long long B, long long D,
                             long long k, long long n, long long s, long long chunk,
                             long long nblk) {
  extern __shared__ unsigned char smem_raw[];
  A* coef = reinterpret_cast<A*>(smem_raw);
  const long long b = blockIdx.y, blk = blockIdx.x;
  const long long P = 3 * mem + 4;
  const A* src = work + B * nblk * P + b * P;
  for (long long q = threadIdx.x; q < P; q += blockDim.x) coef[q] = src[q];
  __syncthreads();
  const int flags = int(coef[3 * mem + 2]);
  const bool still = flags & 1, improved = flags & 2, ok = flags & 4;
  const A inv_den = coef[3 * mem], vg = coef[3 * mem + 1];
  const long long start = blk * chunk;
  const long long end = start + chunk < D ? start + chunk : D;
  T* xb = x + b * D;
  const T* fb = fx + b * D;
  T* gpb = gprev + b * D;
  T* dxb = dx + b * D;
  T* bb = best + b * D;
  T* us = U + (s * B + b) * D;
  T* vs = V + (s * B + b) * D;
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    A f, g, gs, dg;
    residuals<T, A>(fb, xb, gpb, i, f, g, gs, dg);
    const A d = ld(dxb[i]);
    A v = -d, bdg = -dg, bg = -gs;
    for (long long j = 0; j < n; ++j) {
      const A uu = ld(U[(j * B + b) * D + i]);
      v += coef[j] * ld(V[(j * B + b) * D + i]);
      bdg += coef[mem + j] * uu;
      bg += coef[2 * mem + j] * uu;
    }
    if (improved) bb[i] = xb[i];  // before x moves
    if (k > 0) {
      const A u = ok ? (d - bdg) * inv_den : A(0);
      bg += vg * u;
      st(us + i, u);
      st(vs + i, ok ? v : A(0));
    }
    const A xo = ld(xb[i]);
    T xn = xb[i];
    if (still) st(&xn, xo - bg);
    st(dxb + i, ld(xn) - xo);
    st(gpb + i, gs);
    xb[i] = xn;
  }
}

}  // namespace getfast_broyden

#define GETFAST_BROYDEN_STEP_KERNELS(SFX, T, A)                                                    \
  extern "C" __global__ void __launch_bounds__(BROYDEN_THREADS)                                  \
      broyden_sdots_##SFX(const T* x, const T* fx, const T* U, const T* V, const T* gprev,       \
                          const T* dx, A* part, long long mem, long long B, long long D,          \
                          long long n, long long chunk) {                                         \
    getfast_broyden::sdots_impl<T, A>(x, fx, U, V, gprev, dx, part, mem, B, D, n, chunk);        \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(BROYDEN_THREADS)                                  \
      broyden_supdate_##SFX(T* x, const T* fx, T* U, T* V, T* gprev, T* dx, T* best,             \
                            const A* work, long long mem, long long B, long long D, long long k,  \
                            long long n, long long s, long long chunk, long long nblk) {          \
    getfast_broyden::supdate_impl<T, A>(x, fx, U, V, gprev, dx, best, work, mem, B, D, k, n, s,  \
                                        chunk, nblk);                                             \
  }

#define GETFAST_BROYDEN_SCAL_KERNEL(SFX, A)                                                        \
  extern "C" __global__ void broyden_sscal_##SFX(A* lowest, A* trace, int* status, A* work,       \
                                                 long long mem, long long B, long long T,         \
                                                 long long k, long long n, long long s, int full, \
                                                 long long nblk, A tol, int stop_rel) {           \
    getfast_broyden::sscal_impl<A>(lowest, trace, status, work, mem, B, T, k, n, s, full, nblk,   \
                                   tol, stop_rel);                                                \
  }

GETFAST_BROYDEN_STEP_KERNELS(f32, float, float)
GETFAST_BROYDEN_STEP_KERNELS(f64, double, double)
#ifndef GETFAST_NO_HALF
GETFAST_BROYDEN_STEP_KERNELS(f16, __half, float)
GETFAST_BROYDEN_STEP_KERNELS(bf16, __nv_bfloat16, float)
#endif
GETFAST_BROYDEN_SCAL_KERNEL(f32, float)
GETFAST_BROYDEN_SCAL_KERNEL(f64, double)

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


template <typename T, typename A>
const char* launch_step(std::uintptr_t x, std::uintptr_t fx, std::uintptr_t U, std::uintptr_t V,
                        std::uintptr_t gprev, std::uintptr_t dx, std::uintptr_t best,
                        std::uintptr_t lowest, std::uintptr_t trace, std::uintptr_t status,
                        int64_t mem, int64_t B, int64_t D, int64_t Tn, int64_t k, double tol,
                        bool stop_rel, std::uintptr_t work, cudaStream_t st,
                        void (*sdots)(const T*, const T*, const T*, const T*, const T*, const T*,
                                      A*, long long, long long, long long, long long, long long),
                        void (*sscal)(A*, A*, int*, A*, long long, long long, long long, long long,
                                      long long, long long, int, long long, A, int),
                        void (*supdate)(T*, const T*, T*, T*, T*, T*, T*, const A*, long long,
                                        long long, long long, long long, long long, long long,
                                        long long, long long)) {
  if (B > 65535) return "batch larger than 65535 is not supported by the CUDA Broyden step";
  const size_t smem = static_cast<size_t>(3 * mem + 4) * sizeof(A);
  if (smem > 48 * 1024) return "memory too large for the CUDA Broyden step (3*mem+4 coefficients in 48 KiB)";
  const int64_t nblk = broyden_blocks_per_sample(D);
  const int64_t chunk = (D + nblk - 1) / nblk;
  const int64_t n = k > 0 ? (k - 1 < mem ? k - 1 : mem) : 0;
  const int64_t s = k > 0 ? (k - 1) % mem : 0;
  const int full = (k > 0 && k - 1 >= mem) ? 1 : 0;
  dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  sdots<<<grid, BROYDEN_THREADS, 0, st>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(fx), reinterpret_cast<const T*>(U),
      reinterpret_cast<const T*>(V), reinterpret_cast<const T*>(gprev),
      reinterpret_cast<const T*>(dx), reinterpret_cast<A*>(work), mem, B, D, n, chunk);
  sscal<<<static_cast<unsigned>(B), 32, 0, st>>>(
      reinterpret_cast<A*>(lowest), reinterpret_cast<A*>(trace), reinterpret_cast<int*>(status),
      reinterpret_cast<A*>(work), mem, B, Tn, k, n, s, full, nblk, A(tol), stop_rel ? 1 : 0);
  supdate<<<grid, BROYDEN_THREADS, smem, st>>>(
      reinterpret_cast<T*>(x), reinterpret_cast<const T*>(fx), reinterpret_cast<T*>(U),
      reinterpret_cast<T*>(V), reinterpret_cast<T*>(gprev), reinterpret_cast<T*>(dx),
      reinterpret_cast<T*>(best), reinterpret_cast<const A*>(work), mem, B, D, k, n, s, chunk,
      nblk);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* broyden_step_cuda(int dtype, std::uintptr_t x, std::uintptr_t fx, std::uintptr_t U,
                              std::uintptr_t V, std::uintptr_t gprev, std::uintptr_t dx,
                              std::uintptr_t best, std::uintptr_t lowest, std::uintptr_t trace,
                              std::uintptr_t status, int64_t mem, int64_t B, int64_t D, int64_t T,
                              int64_t k, double tol, bool stop_rel, std::uintptr_t work,
                              std::uintptr_t stream) {
  if (mem < 1) return "mem must be >= 1";
  if (B <= 0 || D <= 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_step<float, float>(x, fx, U, V, gprev, dx, best, lowest, trace, status, mem, B, D, T, k, tol, stop_rel, work, st, broyden_sdots_f32, broyden_sscal_f32, broyden_supdate_f32);
    case 1: return launch_step<double, double>(x, fx, U, V, gprev, dx, best, lowest, trace, status, mem, B, D, T, k, tol, stop_rel, work, st, broyden_sdots_f64, broyden_sscal_f64, broyden_supdate_f64);
    case 2: return launch_step<__half, float>(x, fx, U, V, gprev, dx, best, lowest, trace, status, mem, B, D, T, k, tol, stop_rel, work, st, broyden_sdots_f16, broyden_sscal_f32, broyden_supdate_f16);
    case 3: return launch_step<__nv_bfloat16, float>(x, fx, U, V, gprev, dx, best, lowest, trace, status, mem, B, D, T, k, tol, stop_rel, work, st, broyden_sdots_bf16, broyden_sscal_f32, broyden_supdate_bf16);
    default: return "unknown dtype code";
  }
}

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
