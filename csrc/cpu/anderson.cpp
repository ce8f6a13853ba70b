// Fused Anderson-acceleration step on CPU (Anderson 1965; Walker & Ni 2011). Contract, buffer
// layouts and the reference: getfast/ops/anderson/. Per sample b, with s = k % m,
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

#include "cpu/common.h"
#include "registry.h"

namespace getfast {
namespace {

constexpr int kMaxM = 32;  // getfast/ops/anderson MAX_M

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

// ptrs: X, G, H, best, lowest, trace, status, fx; ints: m, B, D, T, k, stop_rel; reals: tau,
// lam, tol, rtol, eps.
template <typename T>
void anderson_step_impl(const Ptrs& p, const Ints& n_, const Reals& r) {
  using IO = cpu::Io<T>;
  using A = typename IO::acc;
  T *X = ptr<T>(p[0]), *G = ptr<T>(p[1]), *best = ptr<T>(p[3]);
  A *H = ptr<A>(p[2]), *lowest = ptr<A>(p[4]), *trace = ptr<A>(p[5]);
  int32_t* status = ptr<int32_t>(p[6]);
  const T* fx = ptr<const T>(p[7]);
  const int64_t m = n_[0], B = n_[1], D = n_[2], Tn = n_[3], k = n_[4];
  const bool stop_rel = n_[5] != 0;
  const double tau_d = r[0], lam_d = r[1], tol_d = r[2], rtol_d = r[3];
  const int64_t s = k % m;
  const int n = static_cast<int>(std::min<int64_t>(k + 1, m));
  const int64_t nxt = (k + 1) % m;
  const A tau = static_cast<A>(tau_d), lam = static_cast<A>(lam_d), rtol = static_cast<A>(rtol_d);
  const A rel_eps = static_cast<A>(r[4]);

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
    A gblk[cpu::kBlock];
    for (int64_t i0 = 0; i0 < D; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, D - i0);
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
    bool improved;
    const bool still = cpu::residual_bookkeeping(ss_g, ss_f, rel_eps, tol_d, stop_rel, b, B, Tn, k, lowest, trace,
                                                 status, &improved);
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
    A blk[cpu::kBlock];
    for (int64_t i0 = 0; i0 < D; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, D - i0);
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

void anderson_step_cpu(int dtype, const Ptrs& p, const Ints& n, const Reals& r) {
  if (n[0] < 1 || n[0] > kMaxM) throw std::invalid_argument("anderson_step_cpu: m must be in [1, 32]");
  if (n[4] < 0 || n[4] >= n[3]) throw std::invalid_argument("anderson_step_cpu: k out of range of trace");
  cpu::by_dtype(dtype, [&](auto t) { anderson_step_impl<decltype(t)>(p, n, r); });
}

}  // namespace
}  // namespace getfast

GETFAST_BIND(anderson) {
  getfast::def_cpu(m, "anderson_step_cpu", &getfast::anderson_step_cpu);
  GETFAST_DEF_CUDA(m, anderson_step_cuda);
}
