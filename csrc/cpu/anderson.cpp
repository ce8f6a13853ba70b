// Fused Anderson-acceleration step on CPU (Anderson 1965; Walker & Ni 2011). Contract, buffer
// layouts and the reference: getfast/ops/anderson.py. Per sample b, with s = k % m,
// n = min(k+1, m), nxt = (k+1) % m:
//   pass 1 (one read of the live residual history):
//       g = fx - X[s]; G[s] = g (state dtype); dots_j = <G[s], G[j]> (j < n); |g|^2; |fx|^2
//   scalars: Gram row/column of H, abs/rel residuals into trace[:, b, k], running minima,
//       step of the minimum, status; Cholesky solve of (H + lam I) w = 1, alpha = w / sum(w),
//       per-sample fallback alpha = e_s when a pivot <= rtol * diagonal or alpha is not finite
//   pass 2 (one read of the live X and G history):
//       running samples: X[nxt] = sum_j alpha_j (X[j] + tau G[j]); frozen ones: X[nxt] = X[s];
//       improved samples: best = fx
// Samples are independent (OpenMP over b); D is processed in cache blocks so each block of the
// new residual stays in L1 while it is dotted with every history slot.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/deq_common.h"
#include "registry.h"
#ifdef GETFAST_WITH_CUDA
#include <stdexcept>
#include <string>

#include "cuda/anderson.h"
#endif

namespace getfast {
namespace {

constexpr int kMaxM = 32;  // mirrors getfast/ops/anderson.py MAX_M

// Solve (Hn + lam I) w = 1 by Cholesky (n x n, row-major with stride ld), alpha = w / sum(w).
// Returns false when a pivot is <= rtol * its diagonal, or alpha is not finite.
template <typename A>
bool small_solve(const A* Hn, int64_t ld, int n, A lam, A rtol, A* alpha) {
  A L[kMaxM][kMaxM];
  A diag[kMaxM];
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) L[i][j] = Hn[i * ld + j];
    L[i][i] += lam;
    diag[i] = L[i][i];
  }
  for (int j = 0; j < n; ++j) {
    A d = L[j][j];
    for (int p = 0; p < j; ++p) d -= L[j][p] * L[j][p];
    if (!(d > rtol * diag[j])) return false;  // also catches NaN
    const A ljj = std::sqrt(d);
    L[j][j] = ljj;
    for (int i = j + 1; i < n; ++i) {
      A v = L[i][j];
      for (int p = 0; p < j; ++p) v -= L[i][p] * L[j][p];
      L[i][j] = v / ljj;
    }
  }
  A y[kMaxM];
  for (int i = 0; i < n; ++i) {  // L y = 1
    A v = A(1);
    for (int p = 0; p < i; ++p) v -= L[i][p] * y[p];
    y[i] = v / L[i][i];
  }
  A sum = A(0);
  for (int i = n - 1; i >= 0; --i) {  // L^T w = y
    A v = y[i];
    for (int p = i + 1; p < n; ++p) v -= L[p][i] * alpha[p];
    alpha[i] = v / L[i][i];
    sum += alpha[i];
  }
  bool ok = std::isfinite(sum);
  for (int i = 0; i < n; ++i) {
    alpha[i] /= sum;
    ok = ok && std::isfinite(alpha[i]);
  }
  return ok;
}

template <typename T>
void anderson_step_impl(T* X, T* G, typename deq::Io<T>::acc* H, const T* fx, T* best,
                        typename deq::Io<T>::acc* lowest, typename deq::Io<T>::acc* trace,
                        int32_t* status, int64_t m, int64_t B, int64_t D, int64_t Tn, int64_t k,
                        double tau_d, double lam_d, double tol_d, bool stop_rel, double rtol_d) {
  using IO = deq::Io<T>;
  using A = typename IO::acc;
  const int64_t s = k % m;
  const int n = static_cast<int>(std::min<int64_t>(k + 1, m));
  const int64_t nxt = (k + 1) % m;
  const A tau = static_cast<A>(tau_d), lam = static_cast<A>(lam_d), rtol = static_cast<A>(rtol_d);
  const A inf = std::numeric_limits<A>::infinity();
  constexpr A rel_eps = A(1e-9);

  // Parallel over samples only when there is enough work to amortise waking the team (on a
  // loaded machine an idle-waiting OpenMP barrier costs more than a small step).
  const bool par = B > 1 && B * D * n >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t b = 0; b < B; ++b) {
    T* xs = X + (s * B + b) * D;
    T* gs = G + (s * B + b) * D;
    const T* fb = fx + b * D;
    // ---- pass 1: residual, Gram row, norms ----
    double dots[kMaxM] = {0};
    double ss_g = 0.0, ss_f = 0.0;
    A gblk[deq::kBlock];
    for (int64_t i0 = 0; i0 < D; i0 += deq::kBlock) {
      const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
      A sg = A(0), sf = A(0), sgs = A(0);
#pragma omp simd reduction(+ : sg, sf, sgs)
      for (int64_t i = 0; i < len; ++i) {
        const A f = IO::ld(fb[i0 + i]);
        const A g = f - IO::ld(xs[i0 + i]);
        const T gst = IO::st(g);
        gs[i0 + i] = gst;
        const A gr = IO::ld(gst);  // the Gram uses the stored (rounded) residual
        gblk[i] = gr;
        sg += g * g;
        sf += f * f;
        sgs += gr * gr;
      }
      ss_g += sg;
      ss_f += sf;
      dots[s] += sgs;
      for (int j = 0; j < n; ++j) {
        if (j == s) continue;
        const T* gj = G + (j * B + b) * D + i0;
        A acc = A(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < len; ++i) acc += gblk[i] * IO::ld(gj[i]);
        dots[j] += acc;
      }
    }
    A* Hb = H + b * m * m;
    for (int j = 0; j < n; ++j) {
      Hb[s * m + j] = static_cast<A>(dots[j]);
      Hb[j * m + s] = static_cast<A>(dots[j]);
    }
    // ---- bookkeeping ----
    A abs_r = static_cast<A>(std::sqrt(static_cast<A>(ss_g)));
    const A f_norm = static_cast<A>(std::sqrt(static_cast<A>(ss_f)));
    const bool finite = std::isfinite(abs_r) && std::isfinite(f_norm);
    A rel_r = finite ? abs_r / (f_norm + rel_eps) : inf;
    if (!finite) abs_r = inf;
    const int32_t st0 = status[b];
    const bool running = st0 == 0;
    // frozen samples: lowest residuals if converged, inf if non-finite (torchdeq-style padding)
    trace[(0 * B + b) * Tn + k] = running ? abs_r : (st0 == 1 ? lowest[b] : inf);
    trace[(1 * B + b) * Tn + k] = running ? rel_r : (st0 == 1 ? lowest[B + b] : inf);
    bool improved = false;
    int32_t st1 = st0;
    if (running) {
      const A crit = stop_rel ? rel_r : abs_r;
      const A lo_crit = stop_rel ? lowest[B + b] : lowest[b];
      improved = crit < lo_crit;
      lowest[b] = std::min(lowest[b], abs_r);
      lowest[B + b] = std::min(lowest[B + b], rel_r);
      if (improved) lowest[2 * B + b] = static_cast<A>(k + 1);
      const A new_lo = stop_rel ? lowest[B + b] : lowest[b];
      if (!finite) st1 = 2;
      else if (tol_d >= 0.0 && new_lo < static_cast<A>(tol_d)) st1 = 1;
      status[b] = st1;
    }
    const bool still = st1 == 0;
    // ---- small solve ----
    A alpha[kMaxM];
    if (still) {
      bool ok = true;
      if (n == 1) alpha[0] = A(1);
      else ok = small_solve<A>(Hb, m, n, lam, rtol, alpha);
      if (!ok) {
        for (int j = 0; j < n; ++j) alpha[j] = A(0);
        alpha[s] = A(1);
      }
    }
    // ---- pass 2: mixing (running) or hold (frozen), lowest-residual copy ----
    T* xn = X + (nxt * B + b) * D;
    T* bb = best + b * D;
    A blk[deq::kBlock];
    for (int64_t i0 = 0; i0 < D; i0 += deq::kBlock) {
      const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
      // best first: fx may alias X[s] (f returning its input), which the mix may overwrite
      if (improved)
        for (int64_t i = 0; i < len; ++i) bb[i0 + i] = fb[i0 + i];
      if (still) {
        for (int64_t i = 0; i < len; ++i) blk[i] = A(0);
        for (int j = 0; j < n; ++j) {
          const T* xj = X + (j * B + b) * D + i0;
          const T* gj = G + (j * B + b) * D + i0;
          const A aj = alpha[j], atj = alpha[j] * tau;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) blk[i] += aj * IO::ld(xj[i]) + atj * IO::ld(gj[i]);
        }
        for (int64_t i = 0; i < len; ++i) xn[i0 + i] = IO::st(blk[i]);
      } else if (nxt != s) {
        for (int64_t i = 0; i < len; ++i) xn[i0 + i] = xs[i0 + i];
      }
    }
  }
}

void anderson_step_cpu(int dtype, std::uintptr_t X, std::uintptr_t G, std::uintptr_t H,
                       std::uintptr_t fx, std::uintptr_t best, std::uintptr_t lowest,
                       std::uintptr_t trace, std::uintptr_t status, int64_t m, int64_t B, int64_t D,
                       int64_t Tn, int64_t k, double tau, double lam, double tol, bool stop_rel,
                       double rtol) {
  if (m < 1 || m > kMaxM) throw pybind11::value_error("anderson_step_cpu: m must be in [1, 32]");
  if (k < 0 || k >= Tn) throw pybind11::value_error("anderson_step_cpu: k out of range of trace");
  using deq::bf16_t;
  using deq::half_t;
#define GETFAST_ANDERSON_CALL(T)                                                                \
  anderson_step_impl<T>(ptr<T>(X), ptr<T>(G), ptr<deq::Io<T>::acc>(H), ptr<const T>(fx),       \
                        ptr<T>(best), ptr<deq::Io<T>::acc>(lowest), ptr<deq::Io<T>::acc>(trace), \
                        ptr<int32_t>(status), m, B, D, Tn, k, tau, lam, tol, stop_rel, rtol)
  switch (dtype) {
    case 0: GETFAST_ANDERSON_CALL(float); break;
    case 1: GETFAST_ANDERSON_CALL(double); break;
    case 2: GETFAST_ANDERSON_CALL(half_t); break;
    case 3: GETFAST_ANDERSON_CALL(bf16_t); break;
    default: throw pybind11::value_error("anderson_step_cpu: unknown dtype code");
  }
#undef GETFAST_ANDERSON_CALL
}

}  // namespace
}  // namespace getfast

GETFAST_BIND(anderson) {
  namespace py = pybind11;
  using namespace py::literals;
  m.def("anderson_step_cpu", &getfast::anderson_step_cpu, "dtype"_a, "X"_a, "G"_a, "H"_a, "fx"_a,
        "best"_a, "lowest"_a, "trace"_a, "status"_a, "m"_a, "B"_a, "D"_a, "T"_a, "k"_a, "tau"_a,
        "lam"_a, "tol"_a, "stop_rel"_a, "rtol"_a,
        "Fused Anderson step on CPU (buffers as data pointers; see getfast/ops/anderson.py).",
        py::call_guard<py::gil_scoped_release>());
#ifdef GETFAST_WITH_CUDA
  m.def(
      "anderson_step_cuda",
      [](int dtype, std::uintptr_t X, std::uintptr_t G, std::uintptr_t H, std::uintptr_t fx,
         std::uintptr_t best, std::uintptr_t lowest, std::uintptr_t trace, std::uintptr_t status,
         int64_t m, int64_t B, int64_t D, int64_t Tn, int64_t k, double tau, double lam,
         double tol, bool stop_rel, double rtol, std::uintptr_t work, std::uintptr_t stream) {
        if (const char* err = getfast::anderson_step_cuda(dtype, X, G, H, fx, best, lowest, trace,
                                                          status, m, B, D, Tn, k, tau, lam, tol,
                                                          stop_rel, rtol, work, stream))
          throw std::runtime_error(std::string("anderson_step_cuda: ") + err);
      },
      "dtype"_a, "X"_a, "G"_a, "H"_a, "fx"_a, "best"_a, "lowest"_a, "trace"_a, "status"_a, "m"_a,
      "B"_a, "D"_a, "T"_a, "k"_a, "tau"_a, "lam"_a, "tol"_a, "stop_rel"_a, "rtol"_a, "work"_a,
      "stream"_a, "Fused Anderson step on CUDA, launched on `stream` (see getfast/ops/anderson.py).");
#endif
}
