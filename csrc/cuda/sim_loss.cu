// SIM score-divergence surrogate on CUDA (math: getfast/ops/sim/__init__.py). Compiled by nvcc
// into getfast._C, or by NVRTC through CuPy (getfast/ops/_cupy.py, which instantiates the kernel
// templates by name), so the device part is free of host headers.
//   forward : grid (B), 256 threads; one block per sample: Σd², Σd·w, then r, P and the loss.
//   backward: grid (⌈N / 1024⌉, min(B, 65535)), 256 threads; elementwise from the stats (r, P).
#include "common.cuh"

namespace getfast {

template <typename T, typename A>
__global__ void __launch_bounds__(256)
    sim_loss_fwd(const T* __restrict__ a, const T* __restrict__ f, const T* __restrict__ g,
                 const A* __restrict__ sigma, A* __restrict__ loss, A* __restrict__ stats, long long B,
                 long long N, A c) {
  __shared__ A sh[32];
  const long long b = blockIdx.x;
  A dd = A(0), dw = A(0);
  for (long long i = threadIdx.x; i < N; i += blockDim.x) {
    const A fi = ld(f[b * N + i]);
    const A d = ld(a[b * N + i]) - fi;
    const A w = fi - ld(g[b * N + i]);
    dd += d * d;
    dw += d * w;
  }
  dd = block_sum(dd, sh);
  dw = block_sum(dw, sh);
  if (threadIdx.x == 0) {
    const A s = sigma[b] * sigma[b];
    const A r = sqrt(dd / (s * s) + c * c);
    const A P = dw / s;
    loss[b] = P / (r * s);
    stats[2 * b] = r;
    stats[2 * b + 1] = P;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(256)
    sim_loss_bwd(const A* __restrict__ grad, const T* __restrict__ a, const T* __restrict__ f,
                 const T* __restrict__ g, const A* __restrict__ sigma, const A* __restrict__ stats,
                 T* __restrict__ ga, T* __restrict__ gf, T* __restrict__ gg, long long B, long long N) {
  for (long long b = blockIdx.y; b < B; b += gridDim.y) {
    const A s = sigma[b] * sigma[b];
    const A r = stats[2 * b], P = stats[2 * b + 1];
    const A alpha = grad[b] / (r * s * s);
    const A beta = alpha * P / (r * r * s);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (long long)gridDim.x * blockDim.x) {
      const long long o = b * N + i;
      const A fi = ld(f[o]);
      const A d = ld(a[o]) - fi;
      const A x = alpha * (fi - ld(g[o])) - beta * d;
      const A z = -alpha * d;
      st(ga + o, x);
      st(gg + o, z);
      st(gf + o, -x - z);
    }
  }
}

}  // namespace getfast

#ifndef __CUDACC_RTC__
namespace getfast {

// fwd ptrs: a, f, g, sigma, loss, stats; ints: B, N; reals: c.
const char* sim_loss_fwd_cuda(int dtype, const Ptrs& p, const Ints& n, const Reals& r, std::uintptr_t stream) {
  if (n[0] <= 0 || n[1] <= 0) return nullptr;
  return by_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    sim_loss_fwd<T, A><<<unsigned(n[0]), 256, 0, as_stream(stream)>>>(
        ptr<const T>(p[0]), ptr<const T>(p[1]), ptr<const T>(p[2]), ptr<const A>(p[3]), ptr<A>(p[4]), ptr<A>(p[5]),
        n[0], n[1], A(r[0]));
    return launched();
  });
}

// bwd ptrs: grad, a, f, g, sigma, stats, grad_a, grad_f, grad_g; ints: B, N.
const char* sim_loss_bwd_cuda(int dtype, const Ptrs& p, const Ints& n, const Reals&, std::uintptr_t stream) {
  if (n[0] <= 0 || n[1] <= 0) return nullptr;
  const dim3 grid(unsigned(std::min<int64_t>((n[1] + 1023) / 1024, 1 << 20)), unsigned(std::min<int64_t>(n[0], 65535)));
  return by_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    sim_loss_bwd<T, A><<<grid, 256, 0, as_stream(stream)>>>(
        ptr<const A>(p[0]), ptr<const T>(p[1]), ptr<const T>(p[2]), ptr<const T>(p[3]), ptr<const A>(p[4]),
        ptr<const A>(p[5]), ptr<T>(p[6]), ptr<T>(p[7]), ptr<T>(p[8]), n[0], n[1]);
    return launched();
  });
}

}  // namespace getfast
#endif
