// Fused Anderson-acceleration step on CUDA (Anderson 1965; Walker & Ni 2011). Contract, buffers
// and the plain-PyTorch reference: getfast/ops/anderson/. Three launches on the caller's stream,
// s = k % m, n = min(k+1, m):
//   anderson_gram   grid (nblk, B), 256 threads. Block (blk, b) streams its chunk of D once:
//                   g = fx - X[s] (stored to G[s]), partial <G[s], G[j]> (j < n), |g|^2, |fx|^2.
//   anderson_solve  grid (B), 32 threads. Sums the partials, writes the Gram row/column, trace
//                   column k, minima/step/status; thread 0 solves (H + lam I) w = 1 by Cholesky
//                   and writes alpha = w / sum(w) (fallback e_s) and the flags to the workspace.
//   anderson_mix    grid (nblk, B), 256 threads. X[(k+1) % m] = sum_j alpha_j (X[j] + tau G[j])
//                   for running samples, X[s] for frozen ones; best = fx where improved. Each
//                   element is read and written by one thread, so the in-place ring update is
//                   race-free.
#include "common.cuh"

#define ANDERSON_MAX_M 32

namespace getfast {

template <typename T, typename A>
__global__ void __launch_bounds__(256)
    anderson_gram(const T* __restrict__ X, T* __restrict__ G, const T* __restrict__ fx, A* __restrict__ part,
                  long long m, long long B, long long D, long long k, long long chunk) {
  __shared__ A sh[32];
  const long long b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x, s = k % m;
  const int n = int(k + 1 < m ? k + 1 : m);
  const long long end = (blk + 1) * chunk < D ? (blk + 1) * chunk : D;
  const T* xs = X + (s * B + b) * D;
  T* gs = G + (s * B + b) * D;
  A ssg = A(0), ssf = A(0), dots[ANDERSON_MAX_M];
#pragma unroll
  for (int j = 0; j < ANDERSON_MAX_M; ++j) dots[j] = A(0);
  for (long long i = blk * chunk + threadIdx.x; i < end; i += blockDim.x) {
    const A f = ld(fx[b * D + i]);
    const A g = f - ld(xs[i]);
    st(gs + i, g);
    const A gr = ld(gs[i]);  // the Gram uses the stored (rounded) residual; own write, same thread
    ssg += g * g;
    ssf += f * f;
#pragma unroll
    for (int j = 0; j < ANDERSON_MAX_M; ++j)
      if (j < n) dots[j] += gr * ((j == s) ? gr : ld(G[(j * B + b) * D + i]));
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

// (Hb[:n, :n] + lam I) w = 1 by Cholesky in L (shared, stride ANDERSON_MAX_M), alpha = w / sum(w);
// false when a pivot is <= rtol * its diagonal or alpha is not finite.
template <typename A>
__device__ bool small_solve(const A* Hb, long long m, int n, A lam, A rtol, A* alpha, A* L) {
  constexpr int S = ANDERSON_MAX_M;
  A diag[S], y[S];
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) L[i * S + j] = Hb[i * m + j];
    diag[i] = L[i * S + i] += lam;
  }
  for (int j = 0; j < n; ++j) {
    A d = L[j * S + j];
    for (int p = 0; p < j; ++p) d -= L[j * S + p] * L[j * S + p];
    if (!(d > rtol * diag[j])) return false;
    L[j * S + j] = sqrt(d);
    for (int i = j + 1; i < n; ++i) {
      A v = L[i * S + j];
      for (int p = 0; p < j; ++p) v -= L[i * S + p] * L[j * S + p];
      L[i * S + j] = v / L[j * S + j];
    }
  }
  for (int i = 0; i < n; ++i) {
    A v = A(1);
    for (int p = 0; p < i; ++p) v -= L[i * S + p] * y[p];
    y[i] = v / L[i * S + i];
  }
  A sum = A(0);
  for (int i = n - 1; i >= 0; --i) {
    A v = y[i];
    for (int p = i + 1; p < n; ++p) v -= L[p * S + i] * alpha[p];
    alpha[i] = v / L[i * S + i];
    sum += alpha[i];
  }
  bool ok = finite(sum);
  for (int i = 0; i < n; ++i) ok = finite(alpha[i] /= sum) && ok;
  return ok;
}

template <typename A>
__global__ void anderson_solve(A* __restrict__ H, A* __restrict__ lowest, A* __restrict__ trace,
                               int* __restrict__ status, A* __restrict__ work, long long m, long long B, long long T,
                               long long k, long long nblk, A lam, A tol, int stop_rel, A rtol, A eps) {
  __shared__ A sums[ANDERSON_MAX_M + 2];
  __shared__ A Lsh[ANDERSON_MAX_M * ANDERSON_MAX_M];
  const long long b = blockIdx.x, s = k % m;
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
  for (int j = 0; j < n; ++j) Hb[s * m + j] = Hb[j * m + s] = sums[j];
  bool improved;
  const int st1 = residual_bookkeeping<A>(sums[m], sums[m + 1], lowest, trace, status, b, B, T, k, tol, stop_rel, eps,
                                         &improved);
  A* alpha = work + B * nblk * (m + 2) + b * (m + 1);
  if (st1 == 0) {
    bool ok = true;
    if (n == 1) alpha[0] = A(1);
    else ok = small_solve<A>(Hb, m, n, lam, rtol, alpha, Lsh);
    if (!ok)
      for (int j = 0; j < n; ++j) alpha[j] = A(j == s);
  }
  alpha[m] = A((st1 == 0 ? 1 : 0) + (improved ? 2 : 0));
}

// No __restrict__ on X/fx/best: f may return its own input, so fx can alias X[s]. Per element,
// fx is read (best copy) and the history is read before X[(k+1) % m] is written.
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    anderson_mix(T* X, const T* __restrict__ G, const T* fx, T* best, const A* __restrict__ work, long long m,
                 long long B, long long D, long long k, long long chunk, long long nblk_gram, A tau) {
  __shared__ A al[ANDERSON_MAX_M + 1];
  const long long b = blockIdx.y, blk = blockIdx.x, s = k % m, nxt = (k + 1) % m;
  const int n = int(k + 1 < m ? k + 1 : m);
  for (long long j = threadIdx.x; j <= m; j += blockDim.x) al[j] = work[B * nblk_gram * (m + 2) + b * (m + 1) + j];
  __syncthreads();
  const int flags = int(al[m]);
  const bool still = flags & 1, improved = flags & 2;
  const long long end = (blk + 1) * chunk < D ? (blk + 1) * chunk : D;
  for (long long i = blk * chunk + threadIdx.x; i < end; i += blockDim.x) {
    if (improved) best[b * D + i] = fx[b * D + i];
    if (still) {
      A acc = A(0);
      for (int j = 0; j < n; ++j) acc += al[j] * (ld(X[(j * B + b) * D + i]) + tau * ld(G[(j * B + b) * D + i]));
      st(X + (nxt * B + b) * D + i, acc);
    } else if (nxt != s) {
      X[(nxt * B + b) * D + i] = X[(s * B + b) * D + i];
    }
  }
}

}  // namespace getfast

#ifndef __CUDACC_RTC__
namespace getfast {

// ptrs: X, G, H, best, lowest, trace, status, fx, work; ints: m, B, D, T, k, stop_rel, nblk,
// chunk; reals: tau, lam, tol, rtol, eps. work: B * nblk * (m + 2) partials + B * (m + 1).
const char* anderson_step_cuda(int dtype, const Ptrs& p, const Ints& n, const Reals& r, std::uintptr_t stream) {
  const int64_t m = n[0], B = n[1], D = n[2], T = n[3], k = n[4], nblk = n[6], chunk = n[7];
  if (m < 1 || m > ANDERSON_MAX_M) return "m must be in [1, 32]";
  if (B > 65535) return "batch larger than 65535 is not supported by the CUDA Anderson step";
  const cudaStream_t st = as_stream(stream);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  return by_dtype(dtype, [&](auto t, auto a) {
    using T_ = decltype(t);
    using A = decltype(a);
    anderson_gram<T_, A><<<grid, 256, 0, st>>>(ptr<const T_>(p[0]), ptr<T_>(p[1]), ptr<const T_>(p[7]), ptr<A>(p[8]),
                                               m, B, D, k, chunk);
    anderson_solve<A><<<unsigned(B), 32, 0, st>>>(ptr<A>(p[2]), ptr<A>(p[4]), ptr<A>(p[5]), ptr<int>(p[6]),
                                                   ptr<A>(p[8]), m, B, T, k, nblk, A(r[1]), A(r[2]), int(n[5]),
                                                   A(r[3]), A(r[4]));
    anderson_mix<T_, A><<<grid, 256, 0, st>>>(ptr<T_>(p[0]), ptr<const T_>(p[1]), ptr<const T_>(p[7]), ptr<T_>(p[3]),
                                              ptr<const A>(p[8]), m, B, D, k, chunk, nblk, A(r[0]));
    return launched();
  });
}

}  // namespace getfast
#endif
