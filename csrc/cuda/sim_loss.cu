// SIM score-divergence surrogate on CUDA (math: getfast/ops/sim_loss_op.py).
//
// This file is compiled two ways:
//  * by nvcc into getfast._C (the host launchers at the bottom are then compiled too), and
//  * by NVRTC through cupy.RawModule (getfast/ops/_cupy.py): __CUDACC_RTC__ is defined, so
//    only the extern "C" kernels are seen. Keep the device part free of host headers.
//
// Launch configuration (mirrored in getfast/ops/sim_loss_op.py for the CuPy path):
//   forward : grid (B), block SIM_LOSS_THREADS; one block per sample, fp32 (fp64 for double)
//             accumulation, warp-shuffle + shared-memory reduction.
//   backward: grid (ceil(N / SIM_LOSS_THREADS / SIM_LOSS_ITEMS), min(B, 65535)),
//             block SIM_LOSS_THREADS; elementwise using the per-sample stats (r, P).
#ifndef GETFAST_NO_HALF
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define SIM_LOSS_THREADS 256
#define SIM_LOSS_ITEMS 4

namespace getfast_sim_loss {

__device__ __forceinline__ float to_acc(float x, float) { return x; }
__device__ __forceinline__ double to_acc(double x, double) { return x; }
__device__ __forceinline__ float from_acc(float x, float*) { return x; }
__device__ __forceinline__ double from_acc(double x, double*) { return x; }
#ifndef GETFAST_NO_HALF
__device__ __forceinline__ float to_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }
__device__ __forceinline__ __half from_acc(float x, __half*) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 from_acc(float x, __nv_bfloat16*) {
  return __float2bfloat16_rn(x);
}
#endif

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename Acc>
__device__ void fwd_impl(const T* __restrict__ a, const T* __restrict__ f,
                         const T* __restrict__ g, const Acc* __restrict__ sigma, Acc c,
                         long long N, Acc* __restrict__ loss, Acc* __restrict__ stats) {
  __shared__ Acc s_dd[32];
  __shared__ Acc s_dw[32];
  const long long b = blockIdx.x;
  const T* ab = a + b * N;
  const T* fb = f + b * N;
  const T* gb = g + b * N;
  Acc dd = Acc(0), dw = Acc(0);
  for (long long i = threadIdx.x; i < N; i += blockDim.x) {
    const Acc fi = to_acc(fb[i], Acc(0));
    const Acc d = to_acc(ab[i], Acc(0)) - fi;
    const Acc w = fi - to_acc(gb[i], Acc(0));
    dd += d * d;
    dw += d * w;
  }
  dd = warp_sum(dd);
  dw = warp_sum(dw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) {
    s_dd[warp] = dd;
    s_dw[warp] = dw;
  }
  __syncthreads();
  if (warp == 0) {
    dd = lane < nwarps ? s_dd[lane] : Acc(0);
    dw = lane < nwarps ? s_dw[lane] : Acc(0);
    dd = warp_sum(dd);
    dw = warp_sum(dw);
    if (lane == 0) {
      const Acc sg = sigma[b];
      const Acc s = sg * sg;
      const Acc r = sqrt(dd / (s * s) + c * c);
      const Acc P = dw / s;
      loss[b] = P / (r * s);
      stats[2 * b] = r;
      stats[2 * b + 1] = P;
    }
  }
}

template <typename T, typename Acc>
__device__ void bwd_impl(const Acc* __restrict__ grad, const T* __restrict__ a,
                         const T* __restrict__ f, const T* __restrict__ g,
                         const Acc* __restrict__ sigma, const Acc* __restrict__ stats,
                         long long B, long long N, T* __restrict__ ga, T* __restrict__ gf,
                         T* __restrict__ gg) {
  for (long long b = blockIdx.y; b < B; b += gridDim.y) {
    const Acc sg = sigma[b];
    const Acc s = sg * sg;
    const Acc r = stats[2 * b];
    const Acc P = stats[2 * b + 1];
    const Acc alpha = grad[b] / (r * s * s);
    const Acc beta = alpha * P / (r * r * s);
    const long long base = b * N;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += step) {
      const Acc fi = to_acc(f[base + i], Acc(0));
      const Acc d = to_acc(a[base + i], Acc(0)) - fi;
      const Acc w = fi - to_acc(g[base + i], Acc(0));
      const Acc x = alpha * w - beta * d;
      const Acc z = -alpha * d;
      ga[base + i] = from_acc(x, (T*)nullptr);
      gg[base + i] = from_acc(z, (T*)nullptr);
      gf[base + i] = from_acc(-x - z, (T*)nullptr);
    }
  }
}

}  // namespace getfast_sim_loss

#define GETFAST_SIM_LOSS_KERNELS(SUFFIX, T, ACC)                                               \
  extern "C" __global__ void __launch_bounds__(SIM_LOSS_THREADS)                               \
      sim_loss_fwd_##SUFFIX(const T* a, const T* f, const T* g, const ACC* sigma, ACC c,       \
                            long long N, ACC* loss, ACC* stats) {                              \
    getfast_sim_loss::fwd_impl<T, ACC>(a, f, g, sigma, c, N, loss, stats);                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(SIM_LOSS_THREADS)                               \
      sim_loss_bwd_##SUFFIX(const ACC* grad, const T* a, const T* f, const T* g,               \
                            const ACC* sigma, const ACC* stats, long long B, long long N,      \
                            T* ga, T* gf, T* gg) {                                             \
    getfast_sim_loss::bwd_impl<T, ACC>(grad, a, f, g, sigma, stats, B, N, ga, gf, gg);         \
  }

GETFAST_SIM_LOSS_KERNELS(f32, float, float)
GETFAST_SIM_LOSS_KERNELS(f64, double, double)
#ifndef GETFAST_NO_HALF
GETFAST_SIM_LOSS_KERNELS(f16, __half, float)
GETFAST_SIM_LOSS_KERNELS(bf16, __nv_bfloat16, float)
#endif

// ---- host launchers (nvcc only) --------------------------------------------------------
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sim_loss.h"

namespace getfast {
namespace {

unsigned bwd_chunks(int64_t N) {
  const int64_t per_block = int64_t(SIM_LOSS_THREADS) * SIM_LOSS_ITEMS;
  const int64_t chunks = (N + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(chunks, 1 << 20)));
}

template <typename T, typename Acc>
void launch_fwd(std::uintptr_t a, std::uintptr_t f, std::uintptr_t g, std::uintptr_t sigma,
                double c, int64_t B, int64_t N, std::uintptr_t loss, std::uintptr_t stats,
                cudaStream_t st, void (*kernel)(const T*, const T*, const T*, const Acc*, Acc,
                                                long long, Acc*, Acc*)) {
  kernel<<<dim3(static_cast<unsigned>(B)), dim3(SIM_LOSS_THREADS), 0, st>>>(
      reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(f),
      reinterpret_cast<const T*>(g), reinterpret_cast<const Acc*>(sigma), static_cast<Acc>(c),
      static_cast<long long>(N), reinterpret_cast<Acc*>(loss), reinterpret_cast<Acc*>(stats));
}

template <typename T, typename Acc>
void launch_bwd(std::uintptr_t grad, std::uintptr_t a, std::uintptr_t f, std::uintptr_t g,
                std::uintptr_t sigma, std::uintptr_t stats, int64_t B, int64_t N,
                std::uintptr_t ga, std::uintptr_t gf, std::uintptr_t gg, cudaStream_t st,
                void (*kernel)(const Acc*, const T*, const T*, const T*, const Acc*, const Acc*,
                               long long, long long, T*, T*, T*)) {
  dim3 grid(bwd_chunks(N), static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  kernel<<<grid, dim3(SIM_LOSS_THREADS), 0, st>>>(
      reinterpret_cast<const Acc*>(grad), reinterpret_cast<const T*>(a),
      reinterpret_cast<const T*>(f), reinterpret_cast<const T*>(g),
      reinterpret_cast<const Acc*>(sigma), reinterpret_cast<const Acc*>(stats),
      static_cast<long long>(B), static_cast<long long>(N), reinterpret_cast<T*>(ga),
      reinterpret_cast<T*>(gf), reinterpret_cast<T*>(gg));
}

const char* last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* sim_loss_fwd_cuda(int dtype, std::uintptr_t a, std::uintptr_t f, std::uintptr_t g,
                              std::uintptr_t sigma, double c, int64_t B, int64_t N,
                              std::uintptr_t loss, std::uintptr_t stats, std::uintptr_t stream) {
  if (B <= 0 || N <= 0) return nullptr;
  if (B > 0x7fffffffLL) return "batch too large for one grid";
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_fwd<float, float>(a, f, g, sigma, c, B, N, loss, stats, st, sim_loss_fwd_f32); break;
    case 1: launch_fwd<double, double>(a, f, g, sigma, c, B, N, loss, stats, st, sim_loss_fwd_f64); break;
    case 2: launch_fwd<__half, float>(a, f, g, sigma, c, B, N, loss, stats, st, sim_loss_fwd_f16); break;
    case 3: launch_fwd<__nv_bfloat16, float>(a, f, g, sigma, c, B, N, loss, stats, st, sim_loss_fwd_bf16); break;
    default: return "unknown dtype code";
  }
  return last_error();
}

const char* sim_loss_bwd_cuda(int dtype, std::uintptr_t grad, std::uintptr_t a, std::uintptr_t f,
                              std::uintptr_t g, std::uintptr_t sigma, std::uintptr_t stats,
                              int64_t B, int64_t N, std::uintptr_t ga, std::uintptr_t gf,
                              std::uintptr_t gg, std::uintptr_t stream) {
  if (B <= 0 || N <= 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_bwd<float, float>(grad, a, f, g, sigma, stats, B, N, ga, gf, gg, st, sim_loss_bwd_f32); break;
    case 1: launch_bwd<double, double>(grad, a, f, g, sigma, stats, B, N, ga, gf, gg, st, sim_loss_bwd_f64); break;
    case 2: launch_bwd<__half, float>(grad, a, f, g, sigma, stats, B, N, ga, gf, gg, st, sim_loss_bwd_f16); break;
    case 3: launch_bwd<__nv_bfloat16, float>(grad, a, f, g, sigma, stats, B, N, ga, gf, gg, st, sim_loss_bwd_bf16); break;
    default: return "unknown dtype code";
  }
  return last_error();
}

}  // namespace getfast
#endif  // __CUDACC_RTC__
