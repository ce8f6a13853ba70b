// SIM score-divergence surrogate (Luo et al. 2024, "Score Implicit Matching", pseudo-Huber
// distance), fused forward and backward on CPU. Math and the hand-derived backward are in
// getfast/ops/sim/__init__.py. Per sample b (N elements, s = sigma_b^2, d = a - f, w = f - g):
//   forward : dd = sum d^2, dw = sum d*w          (one pass)
//             r = sqrt(dd/s^2 + c^2), P = dw/s, loss = P/(r*s); stats = (r, P)
//   backward: alpha = G/(r s^2), beta = G*P/(r^3 s^3)   (one pass)
//             grad_a = alpha*w - beta*d, grad_g = -alpha*d, grad_f = -grad_a - grad_g
// Float and double inputs; accumulation in double. (bf16/fp16 inputs are upcast to float32
// by the Python wrapper before they reach this file.) OpenMP over the batch.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "registry.h"

namespace getfast {
namespace {

// Below this many elements a parallel region costs more than it saves (and, on a loaded
// machine, a descheduled OpenMP thread stalls every call), so small problems run serially.
constexpr int64_t kParallelMin = 1 << 15;

template <typename T, typename O>
void fwd_impl(const T* a, const T* f, const T* g, const O* sigma, double c, int64_t B,
                      int64_t N, O* loss, O* stats) {
#pragma omp parallel for schedule(static) if (B * N >= kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    const T* ab = a + b * N;
    const T* fb = f + b * N;
    const T* gb = g + b * N;
    double dd = 0.0, dw = 0.0;
#pragma omp simd reduction(+ : dd, dw)
    for (int64_t i = 0; i < N; ++i) {
      const double fi = static_cast<double>(fb[i]);
      const double d = static_cast<double>(ab[i]) - fi;
      const double w = fi - static_cast<double>(gb[i]);
      dd += d * d;
      dw += d * w;
    }
    const double sg = static_cast<double>(sigma[b]);
    const double s = sg * sg;
    const double r = std::sqrt(dd / (s * s) + c * c);
    const double P = dw / s;
    loss[b] = static_cast<O>(P / (r * s));
    stats[2 * b] = static_cast<O>(r);
    stats[2 * b + 1] = static_cast<O>(P);
  }
}

template <typename T, typename O>
void bwd_impl(const O* grad, const T* a, const T* f, const T* g, const O* sigma,
                      const O* stats, int64_t B, int64_t N, T* ga, T* gf, T* gg) {
#pragma omp parallel for schedule(static) if (B * N >= kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    const double sg = static_cast<double>(sigma[b]);
    const double s = sg * sg;
    const double r = static_cast<double>(stats[2 * b]);
    const double P = static_cast<double>(stats[2 * b + 1]);
    const double G = static_cast<double>(grad[b]);
    const double alpha_d = G / (r * s * s);
    const double beta_d = alpha_d * P / (r * r * s);
    // Elementwise math in T (float stays vectorised as float); coefficients from double.
    const T alpha = static_cast<T>(alpha_d);
    const T beta = static_cast<T>(beta_d);
    const T* ab = a + b * N;
    const T* fb = f + b * N;
    const T* gb = g + b * N;
    T* gab = ga + b * N;
    T* gfb = gf + b * N;
    T* ggb = gg + b * N;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
      const T d = ab[i] - fb[i];
      const T w = fb[i] - gb[i];
      const T x = alpha * w - beta * d;
      const T z = -alpha * d;
      gab[i] = x;
      ggb[i] = z;
      gfb[i] = -x - z;
    }
  }
}

// fwd ptrs: a, f, g, sigma, loss, stats; bwd ptrs: grad, a, f, g, sigma, stats, grad_a, grad_f,
// grad_g; ints: B, N; fwd reals: c. float32 (code 0) or float64 (code 1).
void sim_loss_fwd(int dtype, const Ptrs& p, const Ints& n, const Reals& r) {
  auto run = [&](auto t) {
    using T = decltype(t);
    const T* sigma = ptr<const T>(p[3]);
    for (int64_t b = 0; b < n[0]; ++b)  // a sign error in sigma would otherwise pass unnoticed
      if (!(sigma[b] > T(0)))
        throw std::invalid_argument("sim_loss: sigma must be > 0, got " + std::to_string(double(sigma[b])) +
                                    " for sample " + std::to_string(b));
    fwd_impl<T, T>(ptr<const T>(p[0]), ptr<const T>(p[1]), ptr<const T>(p[2]), sigma, r[0], n[0], n[1],
                           ptr<T>(p[4]), ptr<T>(p[5]));
  };
  if (dtype == 0) run(float{});
  else if (dtype == 1) run(double{});
  else throw std::invalid_argument("sim_loss_fwd_cpu: dtype code must be 0 (float32) or 1 (float64)");
}

void sim_loss_bwd(int dtype, const Ptrs& p, const Ints& n, const Reals&) {
  auto run = [&](auto t) {
    using T = decltype(t);
    bwd_impl<T, T>(ptr<const T>(p[0]), ptr<const T>(p[1]), ptr<const T>(p[2]), ptr<const T>(p[3]),
                           ptr<const T>(p[4]), ptr<const T>(p[5]), n[0], n[1], ptr<T>(p[6]), ptr<T>(p[7]),
                           ptr<T>(p[8]));
  };
  if (dtype == 0) run(float{});
  else if (dtype == 1) run(double{});
  else throw std::invalid_argument("sim_loss_bwd_cpu: dtype code must be 0 (float32) or 1 (float64)");
}

}  // namespace
}  // namespace getfast

GETFAST_BIND(sim_loss) {
  getfast::def_cpu(m, "sim_loss_fwd_cpu", &getfast::sim_loss_fwd);
  getfast::def_cpu(m, "sim_loss_bwd_cpu", &getfast::sim_loss_bwd);
  GETFAST_DEF_CUDA(m, sim_loss_fwd_cuda);
  GETFAST_DEF_CUDA(m, sim_loss_bwd_cuda);
}
