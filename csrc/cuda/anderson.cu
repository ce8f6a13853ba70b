// Fused Anderson-acceleration step on CUDA (Anderson 1965; Walker & Ni 2011). Contract, buffer
// layouts and the plain-PyTorch reference: getfast/ops/anderson.py.
//
// Compiled by nvcc into getfast._C; the device part (everything above the host section) is
// NVRTC-clean (extern "C" kernels, no host headers) like every csrc/cuda file.
//
// Three launches per iteration, all on the caller's stream, s = k % m, n = min(k+1, m):
//   anderson_gram_<t>   grid (nblk, B), ANDERSON_THREADS threads. Block (blk, b) streams its
//                       chunk of D once: g = fx - X[s] (stored to G[s] in the state dtype), and
//                       partial sums of <G[s], G[j]> (j < n, dots kept in registers), |g|^2,
//                       |fx|^2 -> work partials [b][blk][m + 2].
//   anderson_solve_<a>  grid (B), 32 threads. Sums the partials, writes the new Gram row/column,
//                       trace column k, running minima/step/status; lane 0 solves
//                       (H + lam I) w = 1 by Cholesky (n <= 32) and writes alpha = w / sum(w)
//                       (fallback e_s) and the flags (still running, improved) to work.
//   anderson_mix_<t>    grid (nblk, B), ANDERSON_THREADS threads. One read of the live X and G
//                       history per element: X[(k+1) % m] = sum_j alpha_j (X[j] + tau G[j]) for
//                       running samples, X[s] for frozen ones; best = fx where improved. Every
//                       element is read and written by one thread, so the in-place ring update
//                       (slot (k+1) % m is also read) has no race.
// Accumulation: float32 (float64 for float64 states).
#ifndef GETFAST_NO_HALF
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define ANDERSON_THREADS 256
#define ANDERSON_MAX_M 32

namespace getfast_anderson {

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
  if (w == 0) {
    r = lane < int(blockDim.x >> 5) ? sh[lane] : A(0);
    r = warp_sum(r);
  }
  return r;
}

__device__ __forceinline__ float inf_of(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_of(double) { return __longlong_as_double(0x7ff0000000000000LL); }

template <typename A>
__device__ __forceinline__ bool finite(A v) {
  return v == v && v - v == A(0);
}

template <typename T, typename A>
__device__ void gram_impl(const T* __restrict__ X, T* __restrict__ G, const T* __restrict__ fx,
                          A* __restrict__ part, long long m, long long B, long long D, long long k,
                          long long chunk) {
  __shared__ A sh[32];
  const long long b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x;
  const long long s = k % m;
  const int n = int(k + 1 < m ? k + 1 : m);
  const long long start = blk * chunk;
  const long long end = start + chunk < D ? start + chunk : D;
  const T* xs = X + (s * B + b) * D;
  T* gs = G + (s * B + b) * D;
  const T* fb = fx + b * D;
  A ssg = A(0), ssf = A(0);
  A dots[ANDERSON_MAX_M];
#pragma unroll
  for (int j = 0; j < ANDERSON_MAX_M; ++j) dots[j] = A(0);
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const A f = ld(fb[i]);
    const A g = f - ld(xs[i]);
    st(gs + i, g);
    const A gr = ld(gs[i]);  // the Gram uses the stored (rounded) residual; own write, same thread
    ssg += g * g;
    ssf += f * f;
#pragma unroll
    for (int j = 0; j < ANDERSON_MAX_M; ++j) {
      if (j < n) {
        const A gj = (j == s) ? gr : ld(G[(j * B + b) * D + i]);
        dots[j] += gr * gj;
      }
    }
  }
  A* out = part + (b * nblk + blk) * (m + 2);
#pragma unroll
  for (int j = 0; j < ANDERSON_MAX_M; ++j) {
    if (j < n) {
      const A r = block_sum(dots[j], sh);
      if (threadIdx.x == 0) out[j] = r;
    }
  }
  const A rg = block_sum(ssg, sh);
  const A rf = block_sum(ssf, sh);
  if (threadIdx.x == 0) {
    out[m] = rg;
    out[m + 1] = rf;
  }
}

template <typename A>
__device__ bool small_solve(const A* __restrict__ Hb, long long m, int n, A lam, A rtol,
                            A* __restrict__ alpha, A* L) {
  // L: n x n scratch (row-major, stride ANDERSON_MAX_M) in shared memory
  A diag[ANDERSON_MAX_M];
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) L[i * ANDERSON_MAX_M + j] = Hb[i * m + j];
    L[i * ANDERSON_MAX_M + i] += lam;
    diag[i] = L[i * ANDERSON_MAX_M + i];
  }
  for (int j = 0; j < n; ++j) {
    A d = L[j * ANDERSON_MAX_M + j];
    for (int p = 0; p < j; ++p) d -= L[j * ANDERSON_MAX_M + p] * L[j * ANDERSON_MAX_M + p];
    if (!(d > rtol * diag[j])) return false;
    const A ljj = sqrt(d);
    L[j * ANDERSON_MAX_M + j] = ljj;
    for (int i = j + 1; i < n; ++i) {
      A v = L[i * ANDERSON_MAX_M + j];
      for (int p = 0; p < j; ++p) v -= L[i * ANDERSON_MAX_M + p] * L[j * ANDERSON_MAX_M + p];
      L[i * ANDERSON_MAX_M + j] = v / ljj;
    }
  }
  A y[ANDERSON_MAX_M];
  for (int i = 0; i < n; ++i) {
    A v = A(1);
    for (int p = 0; p < i; ++p) v -= L[i * ANDERSON_MAX_M + p] * y[p];
    y[i] = v / L[i * ANDERSON_MAX_M + i];
  }
  A sum = A(0);
  for (int i = n - 1; i >= 0; --i) {
    A v = y[i];
    for (int p = i + 1; p < n; ++p) v -= L[p * ANDERSON_MAX_M + i] * alpha[p];
    alpha[i] = v / L[i * ANDERSON_MAX_M + i];
    sum += alpha[i];
  }
  bool ok = finite(sum);
  for (int i = 0; i < n; ++i) {
    alpha[i] /= sum;
    ok = ok && finite(alpha[i]);
  }
  return ok;
}

template <typename A>
__device__ void solve_impl(A* __restrict__ H, A* __restrict__ lowest, A* __restrict__ trace,
                           int* __restrict__ status, A* __restrict__ work, long long m, long long B,
                           long long T, long long k, long long nblk, A tau, A lam, A tol,
                           int stop_rel, A rtol) {
  __shared__ A sums[ANDERSON_MAX_M + 2];
  __shared__ A Lsh[ANDERSON_MAX_M * ANDERSON_MAX_M];
  const long long b = blockIdx.x;
  const long long s = k % m;
  const int n = int(k + 1 < m ? k + 1 : m);
  const A* part = work + b * nblk * (m + 2);
  for (long long j = threadIdx.x; j < m + 2; j += blockDim.x) {
    if (j < n || j >= m) {
      A acc = A(0);
      for (long long q = 0; q < nblk; ++q) acc += part[q * (m + 2) + j];
      sums[j] = acc;
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  A* Hb = H + b * m * m;
  for (int j = 0; j < n; ++j) {
    Hb[s * m + j] = sums[j];
    Hb[j * m + s] = sums[j];
  }
  const A inf = inf_of(A(0));
  A abs_r = sqrt(sums[m]);
  const A f_norm = sqrt(sums[m + 1]);
  const bool fin = finite(abs_r) && finite(f_norm);
  const A rel_r = fin ? abs_r / (f_norm + A(1e-9)) : inf;
  if (!fin) abs_r = inf;
  const int st0 = status[b];
  // frozen samples: lowest residuals if converged, inf if non-finite (torchdeq-style padding)
  trace[b * T + k] = st0 == 0 ? abs_r : (st0 == 1 ? lowest[b] : inf);
  trace[(B + b) * T + k] = st0 == 0 ? rel_r : (st0 == 1 ? lowest[B + b] : inf);
  int st1 = st0;
  bool improved = false;
  if (st0 == 0) {
    const A crit = stop_rel ? rel_r : abs_r;
    const A lo_crit = stop_rel ? lowest[B + b] : lowest[b];
    improved = crit < lo_crit;
    lowest[b] = abs_r < lowest[b] ? abs_r : lowest[b];
    lowest[B + b] = rel_r < lowest[B + b] ? rel_r : lowest[B + b];
    if (improved) lowest[2 * B + b] = A(k + 1);
    const A new_lo = stop_rel ? lowest[B + b] : lowest[b];
    if (!fin) st1 = 2;
    else if (tol >= A(0) && new_lo < tol) st1 = 1;
    status[b] = st1;
  }
  const bool still = st1 == 0;
  A* alpha = work + B * nblk * (m + 2) + b * (m + 1);
  if (still) {
    bool ok = true;
    if (n == 1) alpha[0] = A(1);
    else ok = small_solve<A>(Hb, m, n, lam, rtol, alpha, Lsh);
    if (!ok) {
      for (int j = 0; j < n; ++j) alpha[j] = A(0);
      alpha[s] = A(1);
    }
  }
  alpha[m] = A((still ? 1 : 0) + (improved ? 2 : 0));
}

// No __restrict__ on X/fx/best: f may return its own input, so fx can alias X[s]. Per element,
// fx is read (best copy) and the history is read before X[(k+1) % m] is written.
template <typename T, typename A>
__device__ void mix_impl(T* X, const T* __restrict__ G, const T* fx, T* best,
                         const A* __restrict__ work, long long m, long long B, long long D,
                         long long k, long long chunk, long long nblk_gram, A tau) {
  __shared__ A al[ANDERSON_MAX_M + 1];
  const long long b = blockIdx.y, blk = blockIdx.x;
  const long long s = k % m, nxt = (k + 1) % m;
  const int n = int(k + 1 < m ? k + 1 : m);
  const A* alpha = work + B * nblk_gram * (m + 2) + b * (m + 1);
  for (long long j = threadIdx.x; j <= m; j += blockDim.x) al[j] = alpha[j];
  __syncthreads();
  const int flags = int(al[m]);
  const bool still = flags & 1, improved = flags & 2;
  const long long start = blk * chunk;
  const long long end = start + chunk < D ? start + chunk : D;
  T* xn = X + (nxt * B + b) * D;
  const T* xs = X + (s * B + b) * D;
  const T* fb = fx + b * D;
  T* bb = best + b * D;
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    if (improved) bb[i] = fb[i];
    if (still) {
      A acc = A(0);
      for (int j = 0; j < n; ++j) {
        const long long off = (j * B + b) * D + i;
        acc += al[j] * (ld(X[off]) + tau * ld(G[off]));
      }
      st(xn + i, acc);
    } else if (nxt != s) {
      xn[i] = xs[i];
    }
  }
}

}  // namespace getfast_anderson

#define GETFAST_ANDERSON_STREAM_KERNELS(SFX, T, A)                                                  \
  extern "C" __global__ void __launch_bounds__(ANDERSON_THREADS)                                 \
      anderson_gram_##SFX(const T* X, T* G, const T* fx, A* part, long long m, long long B,      \
                          long long D, long long k, long long chunk) {                            \
    getfast_anderson::gram_impl<T, A>(X, G, fx, part, m, B, D, k, chunk);                         \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(ANDERSON_THREADS)                                 \
      anderson_mix_##SFX(T* X, const T* G, const T* fx, T* best, const A* work, long long m,     \
                         long long B, long long D, long long k, long long chunk,                  \
                         long long nblk_gram, A tau) {                                            \
    getfast_anderson::mix_impl<T, A>(X, G, fx, best, work, m, B, D, k, chunk, nblk_gram, tau);    \
  }

#define GETFAST_ANDERSON_SOLVE_KERNEL(SFX, A)                                                      \
  extern "C" __global__ void anderson_solve_##SFX(A* H, A* lowest, A* trace, int* status, A* work, \
                                                  long long m, long long B, long long T,          \
                                                  long long k, long long nblk, A tau, A lam,      \
                                                  A tol, int stop_rel, A rtol) {                  \
    getfast_anderson::solve_impl<A>(H, lowest, trace, status, work, m, B, T, k, nblk, tau, lam,   \
                                    tol, stop_rel, rtol);                                         \
  }

GETFAST_ANDERSON_STREAM_KERNELS(f32, float, float)
GETFAST_ANDERSON_STREAM_KERNELS(f64, double, double)
#ifndef GETFAST_NO_HALF
GETFAST_ANDERSON_STREAM_KERNELS(f16, __half, float)
GETFAST_ANDERSON_STREAM_KERNELS(bf16, __nv_bfloat16, float)
#endif
GETFAST_ANDERSON_SOLVE_KERNEL(f32, float)
GETFAST_ANDERSON_SOLVE_KERNEL(f64, double)

// ---- host launcher (nvcc only) ----------------------------------------------------------
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <cstdint>

#include "anderson.h"

namespace getfast {
namespace {

template <typename T, typename A>
const char* launch(std::uintptr_t X, std::uintptr_t G, std::uintptr_t H, std::uintptr_t fx,
                   std::uintptr_t best, std::uintptr_t lowest, std::uintptr_t trace,
                   std::uintptr_t status, int64_t m, int64_t B, int64_t D, int64_t Tn, int64_t k,
                   double tau, double lam, double tol, bool stop_rel, double rtol,
                   std::uintptr_t work, cudaStream_t st,
                   void (*gram)(const T*, T*, const T*, A*, long long, long long, long long,
                                long long, long long),
                   void (*solve)(A*, A*, A*, int*, A*, long long, long long, long long, long long,
                                 long long, A, A, A, int, A),
                   void (*mix)(T*, const T*, const T*, T*, const A*, long long, long long,
                               long long, long long, long long, long long, A)) {
  const int64_t nblk = anderson_blocks_per_sample(D);
  const int64_t chunk = (D + nblk - 1) / nblk;
  if (B > 65535) return "batch larger than 65535 is not supported by the CUDA Anderson step";
  dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  gram<<<grid, ANDERSON_THREADS, 0, st>>>(reinterpret_cast<const T*>(X), reinterpret_cast<T*>(G),
                                          reinterpret_cast<const T*>(fx), reinterpret_cast<A*>(work),
                                          m, B, D, k, chunk);
  solve<<<static_cast<unsigned>(B), 32, 0, st>>>(
      reinterpret_cast<A*>(H), reinterpret_cast<A*>(lowest), reinterpret_cast<A*>(trace),
      reinterpret_cast<int*>(status), reinterpret_cast<A*>(work), m, B, Tn, k, nblk, A(tau), A(lam),
      A(tol), stop_rel ? 1 : 0, A(rtol));
  mix<<<grid, ANDERSON_THREADS, 0, st>>>(reinterpret_cast<T*>(X), reinterpret_cast<const T*>(G),
                                         reinterpret_cast<const T*>(fx), reinterpret_cast<T*>(best),
                                         reinterpret_cast<const A*>(work), m, B, D, k, chunk, nblk,
                                         A(tau));
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* anderson_step_cuda(int dtype, std::uintptr_t X, std::uintptr_t G, std::uintptr_t H,
                               std::uintptr_t fx, std::uintptr_t best, std::uintptr_t lowest,
                               std::uintptr_t trace, std::uintptr_t status, int64_t m, int64_t B,
                               int64_t D, int64_t T, int64_t k, double tau, double lam, double tol,
                               bool stop_rel, double rtol, std::uintptr_t work,
                               std::uintptr_t stream) {
  if (m < 1 || m > ANDERSON_MAX_M) return "m must be in [1, 32]";
  if (B <= 0 || D <= 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch<float, float>(X, G, H, fx, best, lowest, trace, status, m, B, D, T, k, tau, lam,
                                  tol, stop_rel, rtol, work, st, anderson_gram_f32,
                                  anderson_solve_f32, anderson_mix_f32);
    case 1:
      return launch<double, double>(X, G, H, fx, best, lowest, trace, status, m, B, D, T, k, tau,
                                    lam, tol, stop_rel, rtol, work, st, anderson_gram_f64,
                                    anderson_solve_f64, anderson_mix_f64);
    case 2:
      return launch<__half, float>(X, G, H, fx, best, lowest, trace, status, m, B, D, T, k, tau,
                                   lam, tol, stop_rel, rtol, work, st, anderson_gram_f16,
                                   anderson_solve_f32, anderson_mix_f16);
    case 3:
      return launch<__nv_bfloat16, float>(X, G, H, fx, best, lowest, trace, status, m, B, D, T, k,
                                          tau, lam, tol, stop_rel, rtol, work, st,
                                          anderson_gram_bf16, anderson_solve_f32, anderson_mix_bf16);
    default:
      return "unknown dtype code";
  }
}

}  // namespace getfast
#endif  // __CUDACC_RTC__
