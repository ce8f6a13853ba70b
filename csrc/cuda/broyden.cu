// The fused Broyden iteration on CUDA (Broyden 1965; Bai et al. 2019). Math, buffers and the
// reference: getfast/ops/broyden/. n = min(k-1, mem) live pairs, s = (k-1) % mem, P = 3 mem + 4
// values per sample; three launches on the caller's stream:
//   broyden_dots    grid (nblk, B): partial a_j = <U_j, dx>, b_j = <V_j, dg>, c_j = <V_j, g> and
//                   |g|^2, |f|^2, <dx, dg>, <dx, g> over the block's chunk
//   broyden_scal    grid (B), 32 threads: sums partials; bookkeeping; vT dg, vT g, the validity of
//                   the pair; coefficients to the workspace
//   broyden_update  grid (nblk, B): the new pair (u, v) into slot s, B g with the new memory,
//                   x -= B g (running samples), dx, g_prev, best. Each element is read and written
//                   by one thread (the ring slot s is read before it is replaced).
#include "common.cuh"

namespace getfast {

template <typename T, typename A>
__device__ __forceinline__ void residuals(const T* fb, const T* xb, const T* gpb, long long i, A& f, A& g, A& gs,
                                          A& dg) {
  T tmp;
  f = ld(fb[i]);
  g = f - ld(xb[i]);
  st(&tmp, g);
  gs = ld(tmp);
  dg = gs - ld(gpb[i]);
}

template <typename T, typename A>
__global__ void __launch_bounds__(256)
    broyden_dots(const T* __restrict__ x, const T* __restrict__ fx, const T* __restrict__ U, const T* __restrict__ V,
                 const T* __restrict__ gprev, const T* __restrict__ dx, A* __restrict__ part, long long mem,
                 long long B, long long D, long long n, long long chunk) {
  __shared__ A sh[32];
  const long long b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x, P = 3 * mem + 4;
  const long long end = (blk + 1) * chunk < D ? (blk + 1) * chunk : D;
  const T *xb = x + b * D, *fb = fx + b * D, *gpb = gprev + b * D, *dxb = dx + b * D;
  A* out = part + (b * nblk + blk) * P;
  A sums[4] = {A(0), A(0), A(0), A(0)};  // |g|^2, |f|^2, <dx, dg>, <dx, g>
  for (long long i = blk * chunk + threadIdx.x; i < end; i += blockDim.x) {
    A f, g, gs, dg;
    residuals<T, A>(fb, xb, gpb, i, f, g, gs, dg);
    const A d = ld(dxb[i]);
    sums[0] += g * g;
    sums[1] += f * f;
    sums[2] += d * dg;
    sums[3] += d * gs;
  }
  for (int q = 0; q < 4; ++q) {
    const A r = block_sum(sums[q], sh);
    if (threadIdx.x == 0) out[3 * mem + q] = r;
  }
  for (long long j = 0; j < n; ++j) {
    const T *uj = U + (j * B + b) * D, *vj = V + (j * B + b) * D;
    A pa = A(0), pb = A(0), pc = A(0);
    for (long long i = blk * chunk + threadIdx.x; i < end; i += blockDim.x) {
      A f, g, gs, dg;
      residuals<T, A>(fb, xb, gpb, i, f, g, gs, dg);
      const A vv = ld(vj[i]);
      pa += ld(uj[i]) * ld(dxb[i]);
      pb += vv * dg;
      pc += vv * gs;
    }
    pa = block_sum(pa, sh);
    pb = block_sum(pb, sh);
    pc = block_sum(pc, sh);
    if (threadIdx.x == 0) out[j] = pa, out[mem + j] = pb, out[2 * mem + j] = pc;
  }
}

template <typename A>
__global__ void broyden_scal(A* __restrict__ lowest, A* __restrict__ trace, int* __restrict__ status,
                             A* __restrict__ work, long long mem, long long B, long long T, long long k, long long n,
                             long long s, int full, long long nblk, A tol, int stop_rel, A eps) {
  const long long b = blockIdx.x, P = 3 * mem + 4;
  const A* part = work + b * nblk * P;
  A* coef = work + B * nblk * P + b * P;
  for (long long q = threadIdx.x; q < P; q += blockDim.x) {
    A acc = A(0);
    if ((q % mem < n && q < 3 * mem) || q >= 3 * mem)
      for (long long p = 0; p < nblk; ++p) acc += part[p * P + q];
    coef[q] = acc;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  bool improved;
  const int st1 = residual_bookkeeping<A>(coef[3 * mem], coef[3 * mem + 1], lowest, trace, status, b, B, T, k, tol, stop_rel, eps,
                                         &improved);
  bool ok = k > 0;
  A sab = A(0), sac = A(0);
  for (long long j = 0; j < n; ++j) {
    const A a = coef[j], bb = coef[mem + j], c = coef[2 * mem + j];
    ok = ok && finite(a) && finite(bb) && finite(c);
    sab += a * bb;
    sac += a * c;
  }
  const A den = sab - coef[3 * mem + 2], vg = sac - coef[3 * mem + 3];
  ok = ok && finite(den) && den != A(0) && finite(vg);
  if (full) coef[2 * mem + s] = A(0);  // slot s leaves the memory
  coef[3 * mem] = ok ? A(1) / den : A(0);
  coef[3 * mem + 1] = ok ? vg : A(0);
  coef[3 * mem + 2] = A((st1 == 0 ? 1 : 0) + (improved ? 2 : 0) + (ok ? 4 : 0));
}

// No __restrict__ on x/fx: f may return its own input, so fx can alias x.
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    broyden_update(T* x, const T* fx, T* U, T* V, T* gprev, T* dx, T* best, const A* __restrict__ work, long long mem,
                   long long B, long long D, long long k, long long n, long long s, long long chunk, long long nblk) {
  extern __shared__ unsigned char smem_raw[];
  A* coef = reinterpret_cast<A*>(smem_raw);
  const long long b = blockIdx.y, blk = blockIdx.x, P = 3 * mem + 4;
  for (long long q = threadIdx.x; q < P; q += blockDim.x) coef[q] = work[B * nblk * P + b * P + q];
  __syncthreads();
  const int flags = int(coef[3 * mem + 2]);
  const bool still = flags & 1, improved = flags & 2, ok = flags & 4;
  const A inv_den = coef[3 * mem], vg = coef[3 * mem + 1];
  const long long end = (blk + 1) * chunk < D ? (blk + 1) * chunk : D;
  T *xb = x + b * D, *gpb = gprev + b * D, *dxb = dx + b * D;
  for (long long i = blk * chunk + threadIdx.x; i < end; i += blockDim.x) {
    A f, g, gs, dg;
    residuals<T, A>(fx + b * D, xb, gpb, i, f, g, gs, dg);
    const A d = ld(dxb[i]);
    A v = -d, bdg = -dg, bg = -gs;
    for (long long j = 0; j < n; ++j) {
      const A uu = ld(U[(j * B + b) * D + i]);
      v += coef[j] * ld(V[(j * B + b) * D + i]);
      bdg += coef[mem + j] * uu;
      bg += coef[2 * mem + j] * uu;
    }
    if (improved) best[b * D + i] = xb[i];  // before x moves
    if (k > 0) {
      const A u = ok ? (d - bdg) * inv_den : A(0);
      bg += vg * u;
      st(U + (s * B + b) * D + i, u);
      st(V + (s * B + b) * D + i, ok ? v : A(0));
    }
    const A xo = ld(xb[i]);
    T xn = xb[i];
    if (still) st(&xn, xo - bg);
    st(dxb + i, ld(xn) - xo);
    st(gpb + i, gs);
    xb[i] = xn;
  }
}

}  // namespace getfast

#ifndef __CUDACC_RTC__
namespace getfast {

// ptrs: x, U, V, g_prev, dx, best, lowest, trace, status, fx, work; ints: mem, B, D, T, k,
// stop_rel, nblk, chunk; reals: tol, eps. work: (B * nblk + B) * (3 mem + 4).
const char* broyden_step_cuda(int dtype, const Ptrs& p, const Ints& n_, const Reals& r, std::uintptr_t stream) {
  const int64_t mem = n_[0], B = n_[1], D = n_[2], T = n_[3], k = n_[4], nblk = n_[6], chunk = n_[7];
  if (mem < 1) return "mem must be >= 1";
  if (B > 65535) return "batch larger than 65535 is not supported by the CUDA Broyden step";
  const int64_t n = k > 0 ? std::min(k - 1, mem) : 0, s = k > 0 ? (k - 1) % mem : 0;
  const cudaStream_t st = as_stream(stream);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  return by_dtype(dtype, [&](auto t, auto a) {
    using T_ = decltype(t);
    using A = decltype(a);
    const size_t smem = size_t(3 * mem + 4) * sizeof(A);
    if (smem > 48 * 1024) return "memory too large for the CUDA Broyden step (3 mem + 4 coefficients in 48 KiB)";
    broyden_dots<T_, A><<<grid, 256, 0, st>>>(ptr<const T_>(p[0]), ptr<const T_>(p[9]), ptr<const T_>(p[1]),
                                              ptr<const T_>(p[2]), ptr<const T_>(p[3]), ptr<const T_>(p[4]),
                                              ptr<A>(p[10]), mem, B, D, n, chunk);
    broyden_scal<A><<<unsigned(B), 32, 0, st>>>(ptr<A>(p[6]), ptr<A>(p[7]), ptr<int>(p[8]), ptr<A>(p[10]), mem, B, T,
                                                 k, n, s, int(k > 0 && k - 1 >= mem), nblk, A(r[0]), int(n_[5]),
                                                 A(r[1]));
    broyden_update<T_, A><<<grid, 256, smem, st>>>(ptr<T_>(p[0]), ptr<const T_>(p[9]), ptr<T_>(p[1]), ptr<T_>(p[2]),
                                                   ptr<T_>(p[3]), ptr<T_>(p[4]), ptr<T_>(p[5]), ptr<const A>(p[10]),
                                                   mem, B, D, k, n, s, chunk, nblk);
    return launched();
  });
}

}  // namespace getfast
#endif
