// The fused Broyden iteration on CPU (Broyden 1965; Bai et al. 2019): two passes over the U/V
// history per sample, OpenMP over samples. Math, buffers and reference: getfast/ops/broyden/.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "registry.h"

namespace getfast {
namespace {

// ptrs: x, U, V, g_prev, dx, best, lowest, trace, status, fx; ints: mem, B, D, T, k, stop_rel;
// reals: tol, eps.
template <typename T>
void broyden_step_impl(const Ptrs& p, const Ints& n_, const Reals& r) {
  using IO = cpu::Io<T>;
  using A = typename IO::acc;
  T *x = ptr<T>(p[0]), *U = ptr<T>(p[1]), *V = ptr<T>(p[2]), *gprev = ptr<T>(p[3]), *dx = ptr<T>(p[4]);
  T* best = ptr<T>(p[5]);
  A *lowest = ptr<A>(p[6]), *trace = ptr<A>(p[7]);
  int32_t* status = ptr<int32_t>(p[8]);
  const T* fx = ptr<const T>(p[9]);
  const int64_t mem = n_[0], B = n_[1], D = n_[2], Tn = n_[3], k = n_[4];
  const bool stop_rel = n_[5] != 0;
  const double tol_d = r[0];
  const A rel_eps = static_cast<A>(r[1]);
  const int64_t n = k > 0 ? std::min<int64_t>(k - 1, mem) : 0;
  const int64_t s = k > 0 ? (k - 1) % mem : 0;
  const bool full = k > 0 && k - 1 >= mem;
  const bool par = B > 1 && B * D * std::max<int64_t>(n, 1) >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t b = 0; b < B; ++b) {
    T* xb = x + b * D;
    const T* fb = fx + b * D;
    T* gpb = gprev + b * D;
    T* dxb = dx + b * D;
    // coefficients a_j = <U_j, dx>, b_j = <V_j, dg>, c_j = <V_j, g>
    std::vector<double> ca(n, 0.0), cb(n, 0.0), cc(n, 0.0);
    double ss_g = 0.0, ss_f = 0.0, d_xg = 0.0, d_xs = 0.0;  // |g|^2, |f|^2, <dx,dg>, <dx,g>
    A gsb[cpu::kBlock], dgb[cpu::kBlock], dxa[cpu::kBlock];
    // ---- pass 1: one read of the live history ----
    for (int64_t i0 = 0; i0 < D; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, D - i0);
      A sg = A(0), sf = A(0), sxg = A(0), sxs = A(0);
#pragma omp simd reduction(+ : sg, sf, sxg, sxs)
      for (int64_t i = 0; i < len; ++i) {
        const A f = IO::ld(fb[i0 + i]);
        const A g = f - IO::ld(xb[i0 + i]);
        const A gsr = IO::ld(IO::st(g));
        const A dgi = gsr - IO::ld(gpb[i0 + i]);
        const A dxi = IO::ld(dxb[i0 + i]);
        gsb[i] = gsr;
        dgb[i] = dgi;
        dxa[i] = dxi;
        sg += g * g;
        sf += f * f;
        sxg += dxi * dgi;
        sxs += dxi * gsr;
      }
      ss_g += sg;
      ss_f += sf;
      d_xg += sxg;
      d_xs += sxs;
      for (int64_t j = 0; j < n; ++j) {
        const T* uj = U + (j * B + b) * D + i0;
        const T* vj = V + (j * B + b) * D + i0;
        A pa = A(0), pb = A(0), pc = A(0);
#pragma omp simd reduction(+ : pa, pb, pc)
        for (int64_t i = 0; i < len; ++i) {
          const A vv = IO::ld(vj[i]);
          pa += IO::ld(uj[i]) * dxa[i];
          pb += vv * dgb[i];
          pc += vv * gsb[i];
        }
        ca[j] += pa;
        cb[j] += pb;
        cc[j] += pc;
      }
    }
    // ---- bookkeeping (cpu::residual_bookkeeping, as anderson_step; candidate = the iterate x) ----
    bool improved;
    const bool still = cpu::residual_bookkeeping(ss_g, ss_f, rel_eps, tol_d, stop_rel, b, B, Tn, k, lowest, trace,
                                                 status, &improved);
    // ---- the rank-one update's scalars ----
    std::vector<A> a(n), bc(n), c(n);
    A den = A(0), vg = A(0);
    bool ok = k > 0;
    for (int64_t j = 0; j < n; ++j) {
      a[j] = static_cast<A>(ca[j]);
      bc[j] = static_cast<A>(cb[j]);
      c[j] = static_cast<A>(cc[j]);
      ok = ok && std::isfinite(a[j]) && std::isfinite(bc[j]) && std::isfinite(c[j]);
    }
    if (k > 0) {
      A sab = A(0), sac = A(0);
      for (int64_t j = 0; j < n; ++j) {
        sab += a[j] * bc[j];
        sac += a[j] * c[j];
      }
      den = sab - static_cast<A>(d_xg);
      vg = sac - static_cast<A>(d_xs);
      ok = ok && std::isfinite(den) && den != A(0) && std::isfinite(vg);
    }
    if (full) c[s] = A(0);  // slot s leaves the memory
    const A inv_den = ok ? A(1) / den : A(0);
    const A vg_ok = ok ? vg : A(0);
    // ---- pass 2: new pair, step with the new memory, state update ----
    T* bb = best + b * D;
    T* us = U + (s * B + b) * D;
    T* vs = V + (s * B + b) * D;
    A vb[cpu::kBlock], bdg[cpu::kBlock], bgb[cpu::kBlock];
    for (int64_t i0 = 0; i0 < D; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, D - i0);
      for (int64_t i = 0; i < len; ++i) {
        const A g = IO::ld(fb[i0 + i]) - IO::ld(xb[i0 + i]);
        const A gsr = IO::ld(IO::st(g));
        gsb[i] = gsr;
        dgb[i] = gsr - IO::ld(gpb[i0 + i]);
        dxa[i] = IO::ld(dxb[i0 + i]);
        vb[i] = -dxa[i];
        bdg[i] = -dgb[i];
        bgb[i] = -gsr;
      }
      for (int64_t j = 0; j < n; ++j) {
        const T* uj = U + (j * B + b) * D + i0;
        const T* vj = V + (j * B + b) * D + i0;
        const A aj = a[j], bj = bc[j], cj = c[j];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const A uu = IO::ld(uj[i]);
          vb[i] += aj * IO::ld(vj[i]);
          bdg[i] += bj * uu;
          bgb[i] += cj * uu;
        }
      }
      if (improved)
        for (int64_t i = 0; i < len; ++i) bb[i0 + i] = xb[i0 + i];  // before x moves
      for (int64_t i = 0; i < len; ++i) {
        A bg = bgb[i];
        if (k > 0) {
          const A u = ok ? (dxa[i] - bdg[i]) * inv_den : A(0);
          const A v = ok ? vb[i] : A(0);
          bg += vg_ok * u;
          us[i0 + i] = IO::st(u);
          vs[i0 + i] = IO::st(v);
        }
        const A xo = IO::ld(xb[i0 + i]);
        const T xn = still ? IO::st(xo - bg) : xb[i0 + i];
        dxb[i0 + i] = IO::st(IO::ld(xn) - xo);
        gpb[i0 + i] = IO::st(gsb[i]);
        xb[i0 + i] = xn;
      }
    }
  }
}

void broyden_step_cpu(int dtype, const Ptrs& p, const Ints& n, const Reals& r) {
  if (n[0] < 1) throw std::invalid_argument("broyden_step_cpu: mem must be >= 1");
  if (n[4] < 0 || n[4] >= n[3]) throw std::invalid_argument("broyden_step_cpu: k out of range of trace");
  cpu::by_dtype(dtype, [&](auto t) { broyden_step_impl<decltype(t)>(p, n, r); });
}

}  // namespace
}  // namespace getfast

GETFAST_BIND(broyden) {
  getfast::def_cpu(m, "broyden_step_cpu", &getfast::broyden_step_cpu);
  GETFAST_DEF_CUDA(m, broyden_step_cuda);
}
