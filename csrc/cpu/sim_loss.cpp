// SIM score-divergence surrogate (Luo et al. 2024, "Score Implicit Matching", pseudo-Huber
// distance), fused forward and backward on CPU. Math and the hand-derived backward are in
// getfast/ops/sim_loss_op.py. Per sample b (N elements, s = sigma_b^2, d = a - f, w = f - g):
//   forward : dd = sum d^2, dw = sum d*w          (one pass)
//             r = sqrt(dd/s^2 + c^2), P = dw/s, loss = P/(r*s); stats = (r, P)
//   backward: alpha = G/(r s^2), beta = G*P/(r^3 s^3)   (one pass)
//             grad_a = alpha*w - beta*d, grad_g = -alpha*d, grad_f = -grad_a - grad_g
// Float and double inputs; accumulation in double. (bf16/fp16 inputs are upcast to float32
// by the Python wrapper before they reach this file.) OpenMP over the batch.
#include <cmath>
#include <cstdint>

#include "registry.h"
#ifdef GETFAST_WITH_CUDA
#include <stdexcept>
#include <string>

#include "cuda/sim_loss.h"
#endif

namespace getfast {
namespace {

// Below this many elements a parallel region costs more than it saves (and, on a loaded
// machine, a descheduled OpenMP thread stalls every call), so small problems run serially.
constexpr int64_t kParallelMin = 1 << 15;

template <typename T, typename O>
void sim_loss_fwd_cpu(const T* a, const T* f, const T* g, const O* sigma, double c, int64_t B,
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
void sim_loss_bwd_cpu(const O* grad, const T* a, const T* f, const T* g, const O* sigma,
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

// dtype codes shared with Python (getfast/ops/_framework.py DTYPE_CODES): 0 f32, 1 f64.
void fwd_dispatch(int dtype, std::uintptr_t a, std::uintptr_t f, std::uintptr_t g,
                  std::uintptr_t sigma, double c, int64_t B, int64_t N, std::uintptr_t loss,
                  std::uintptr_t stats) {
  if (dtype == 0)
    sim_loss_fwd_cpu<float, float>(ptr<const float>(a), ptr<const float>(f), ptr<const float>(g),
                                   ptr<const float>(sigma), c, B, N, ptr<float>(loss),
                                   ptr<float>(stats));
  else if (dtype == 1)
    sim_loss_fwd_cpu<double, double>(ptr<const double>(a), ptr<const double>(f),
                                     ptr<const double>(g), ptr<const double>(sigma), c, B, N,
                                     ptr<double>(loss), ptr<double>(stats));
  else
    throw pybind11::value_error("sim_loss_fwd_cpu: dtype code must be 0 (float32) or 1 (float64)");
}

void bwd_dispatch(int dtype, std::uintptr_t grad, std::uintptr_t a, std::uintptr_t f,
                  std::uintptr_t g, std::uintptr_t sigma, std::uintptr_t stats, int64_t B,
                  int64_t N, std::uintptr_t ga, std::uintptr_t gf, std::uintptr_t gg) {
  if (dtype == 0)
    sim_loss_bwd_cpu<float, float>(ptr<const float>(grad), ptr<const float>(a),
                                   ptr<const float>(f), ptr<const float>(g),
                                   ptr<const float>(sigma), ptr<const float>(stats), B, N,
                                   ptr<float>(ga), ptr<float>(gf), ptr<float>(gg));
  else if (dtype == 1)
    sim_loss_bwd_cpu<double, double>(ptr<const double>(grad), ptr<const double>(a),
                                     ptr<const double>(f), ptr<const double>(g),
                                     ptr<const double>(sigma), ptr<const double>(stats), B, N,
                                     ptr<double>(ga), ptr<double>(gf), ptr<double>(gg));
  else
    throw pybind11::value_error("sim_loss_bwd_cpu: dtype code must be 0 (float32) or 1 (float64)");
}

#ifdef GETFAST_WITH_CUDA
void check_cuda(const char* what, const char* err) {
  if (err) throw std::runtime_error(std::string(what) + ": CUDA error: " + err);
}
#endif

}  // namespace
}  // namespace getfast

GETFAST_BIND(sim_loss) {
  namespace py = pybind11;
  using namespace py::literals;
  m.def("sim_loss_fwd_cpu", &getfast::fwd_dispatch, "dtype"_a, "a"_a, "f"_a, "g"_a, "sigma"_a,
        "c"_a, "B"_a, "N"_a, "loss"_a, "stats"_a,
        "SIM surrogate forward on CPU (pointers as ints; outputs loss (B,), stats (B,2)).",
        py::call_guard<py::gil_scoped_release>());
  m.def("sim_loss_bwd_cpu", &getfast::bwd_dispatch, "dtype"_a, "grad"_a, "a"_a, "f"_a, "g"_a,
        "sigma"_a, "stats"_a, "B"_a, "N"_a, "grad_a"_a, "grad_f"_a, "grad_g"_a,
        "SIM surrogate backward on CPU.", py::call_guard<py::gil_scoped_release>());
#ifdef GETFAST_WITH_CUDA
  m.def(
      "sim_loss_fwd_cuda",
      [](int dtype, std::uintptr_t a, std::uintptr_t f, std::uintptr_t g, std::uintptr_t sigma,
         double c, int64_t B, int64_t N, std::uintptr_t loss, std::uintptr_t stats,
         std::uintptr_t stream) {
        getfast::check_cuda("sim_loss_fwd_cuda",
                            getfast::sim_loss_fwd_cuda(dtype, a, f, g, sigma, c, B, N, loss,
                                                       stats, stream));
      },
      "dtype"_a, "a"_a, "f"_a, "g"_a, "sigma"_a, "c"_a, "B"_a, "N"_a, "loss"_a, "stats"_a,
      "stream"_a, "SIM surrogate forward on CUDA, launched on `stream` (cudaStream_t as int).");
  m.def(
      "sim_loss_bwd_cuda",
      [](int dtype, std::uintptr_t grad, std::uintptr_t a, std::uintptr_t f, std::uintptr_t g,
         std::uintptr_t sigma, std::uintptr_t stats, int64_t B, int64_t N, std::uintptr_t ga,
         std::uintptr_t gf, std::uintptr_t gg, std::uintptr_t stream) {
        getfast::check_cuda("sim_loss_bwd_cuda",
                            getfast::sim_loss_bwd_cuda(dtype, grad, a, f, g, sigma, stats, B, N,
                                                       ga, gf, gg, stream));
      },
      "dtype"_a, "grad"_a, "a"_a, "f"_a, "g"_a, "sigma"_a, "stats"_a, "B"_a, "N"_a, "grad_a"_a,
      "grad_f"_a, "grad_g"_a, "stream"_a, "SIM surrogate backward on CUDA.");
#endif
}
