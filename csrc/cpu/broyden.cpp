// Broyden low-rank inverse-Jacobian products on CPU (Broyden 1965; Bai et al. 2019).
// Contract and reference: getfast/ops/broyden.py. One function serves both products:
//   out_b = -x_b + sum_{j<n} Bm[j, b] * <A[j, b], x_b>
// with (A, Bm) = (V, U) for (-I + U V^T) x and (U, V) for x^T (-I + U V^T).
// Per sample: pass 1 computes the n dots (one read of A), pass 2 the expansion (one read of Bm).
// Parallel over samples when there are at least as many as threads, else over D blocks.
// broyden_step_cpu: the whole Broyden iteration fused (two passes over the U/V history per
// sample; math and reference in getfast/ops/broyden.py).
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

#include "cuda/broyden.h"
#endif
#ifdef GETFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace getfast {
namespace {

template <typename T>
void lowrank_impl(const T* Am, const T* Bm, const T* x, T* out, int64_t n, int64_t B, int64_t D) {
  using IO = deq::Io<T>;
  using A = typename IO::acc;
  const int64_t nblk = (D + deq::kBlock - 1) / deq::kBlock;
  // dots[b * n + j]
  std::vector<double> dots(static_cast<size_t>(std::max<int64_t>(1, B * n)), 0.0);
  int threads = 1;
#ifdef GETFAST_WITH_OPENMP
  threads = omp_get_max_threads();
#endif
  // Only wake the OpenMP team when there is enough work (see anderson.cpp).
  const bool par = B * D * std::max<int64_t>(n, 1) >= (int64_t(1) << 16);
  if (!par) threads = 1;
  if (n > 0) {
    if (B >= threads) {
#pragma omp parallel for schedule(static) if (par)
      for (int64_t b = 0; b < B; ++b) {
        const T* xb = x + b * D;
        for (int64_t j = 0; j < n; ++j) {
          const T* aj = Am + (j * B + b) * D;
          double s = 0.0;
          for (int64_t i0 = 0; i0 < D; i0 += deq::kBlock) {
            const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
            A acc = A(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < len; ++i) acc += IO::ld(aj[i0 + i]) * IO::ld(xb[i0 + i]);
            s += acc;
          }
          dots[b * n + j] = s;
        }
      }
    } else {
      // few samples: split D into blocks, reduce per (b, j) over the block partials in order
      std::vector<double> part(static_cast<size_t>(B * n * nblk), 0.0);
#pragma omp parallel for collapse(2) schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t i0 = blk * deq::kBlock;
          const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
          const T* xb = x + b * D + i0;
          for (int64_t j = 0; j < n; ++j) {
            const T* aj = Am + (j * B + b) * D + i0;
            A acc = A(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < len; ++i) acc += IO::ld(aj[i]) * IO::ld(xb[i]);
            part[(b * n + j) * nblk + blk] = acc;
          }
        }
      }
      for (int64_t bj = 0; bj < B * n; ++bj) {
        double s = 0.0;
        for (int64_t blk = 0; blk < nblk; ++blk) s += part[bj * nblk + blk];
        dots[bj] = s;
      }
    }
  }
#pragma omp parallel for collapse(2) schedule(static) if (par)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = blk * deq::kBlock;
      const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
      const T* xb = x + b * D + i0;
      T* ob = out + b * D + i0;
      A acc[deq::kBlock];
      for (int64_t i = 0; i < len; ++i) acc[i] = -IO::ld(xb[i]);
      for (int64_t j = 0; j < n; ++j) {
        const A c = static_cast<A>(dots[b * n + j]);
        const T* bj = Bm + (j * B + b) * D + i0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) acc[i] += c * IO::ld(bj[i]);
      }
      for (int64_t i = 0; i < len; ++i) ob[i] = IO::st(acc[i]);
    }
  }
}

void broyden_lowrank_cpu(int dtype, std::uintptr_t Am, std::uintptr_t Bm, std::uintptr_t x,
                         std::uintptr_t out, int64_t n, int64_t B, int64_t D) {
  if (n < 0) throw pybind11::value_error("broyden_lowrank_cpu: n must be >= 0");
  using deq::bf16_t;
  using deq::half_t;
  switch (dtype) {
    case 0: lowrank_impl<float>(ptr<const float>(Am), ptr<const float>(Bm), ptr<const float>(x), ptr<float>(out), n, B, D); break;
    case 1: lowrank_impl<double>(ptr<const double>(Am), ptr<const double>(Bm), ptr<const double>(x), ptr<double>(out), n, B, D); break;
    case 2: lowrank_impl<half_t>(ptr<const half_t>(Am), ptr<const half_t>(Bm), ptr<const half_t>(x), ptr<half_t>(out), n, B, D); break;
    case 3: lowrank_impl<bf16_t>(ptr<const bf16_t>(Am), ptr<const bf16_t>(Bm), ptr<const bf16_t>(x), ptr<bf16_t>(out), n, B, D); break;
    default: throw pybind11::value_error("broyden_lowrank_cpu: unknown dtype code");
  }
}


// ---- the fused Broyden iteration (getfast::broyden_step; math in getfast/ops/broyden.py) ----
template <typename T>
void broyden_step_impl(T* x, const T* fx, T* U, T* V, T* gprev, T* dx, T* best,
                       typename deq::Io<T>::acc* lowest, typename deq::Io<T>::acc* trace,
                       int32_t* status, int64_t mem, int64_t B, int64_t D, int64_t Tn, int64_t k,
                       double tol_d, bool stop_rel) {
  using IO = deq::Io<T>;
  using A = typename IO::acc;
  const int64_t n = k > 0 ? std::min<int64_t>(k - 1, mem) : 0;
  const int64_t s = k > 0 ? (k - 1) % mem : 0;
  const bool full = k > 0 && k - 1 >= mem;
  const A inf = std::numeric_limits<A>::infinity();
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
    A gsb[deq::kBlock], dgb[deq::kBlock], dxa[deq::kBlock];
    // ---- pass 1: one read of the live history ----
    for (int64_t i0 = 0; i0 < D; i0 += deq::kBlock) {
      const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
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
    // ---- bookkeeping (same rules as anderson_step; candidate = the iterate x) ----
    A abs_r = static_cast<A>(std::sqrt(static_cast<A>(ss_g)));
    const A f_norm = static_cast<A>(std::sqrt(static_cast<A>(ss_f)));
    const bool finite = std::isfinite(abs_r) && std::isfinite(f_norm);
    const A rel_r = finite ? abs_r / (f_norm + A(1e-9)) : inf;
    if (!finite) abs_r = inf;
    const int32_t st0 = status[b];
    const bool running = st0 == 0;
    trace[b * Tn + k] = running ? abs_r : (st0 == 1 ? lowest[b] : inf);
    trace[(B + b) * Tn + k] = running ? rel_r : (st0 == 1 ? lowest[B + b] : inf);
    bool improved = false;
    int32_t st1 = st0;
    if (running) {
      improved = (stop_rel ? rel_r : abs_r) < (stop_rel ? lowest[B + b] : lowest[b]);
      lowest[b] = std::min(lowest[b], abs_r);
      lowest[B + b] = std::min(lowest[B + b], rel_r);
      if (improved) lowest[2 * B + b] = static_cast<A>(k + 1);
      const A new_lo = stop_rel ? lowest[B + b] : lowest[b];
      if (!finite) st1 = 2;
      else if (tol_d >= 0.0 && new_lo < static_cast<A>(tol_d)) st1 = 1;
      status[b] = st1;
    }
    const bool still = st1 == 0;
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
    A vb[deq::kBlock], bdg[deq::kBlock], bgb[deq::kBlock];
    for (int64_t i0 = 0; i0 < D; i0 += deq::kBlock) {
      const int64_t len = std::min<int64_t>(deq::kBlock, D - i0);
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

void broyden_step_cpu(int dtype, std::uintptr_t x, std::uintptr_t fx, std::uintptr_t U,
                      std::uintptr_t V, std::uintptr_t gprev, std::uintptr_t dx, std::uintptr_t best,
                      std::uintptr_t lowest, std::uintptr_t trace, std::uintptr_t status, int64_t mem,
                      int64_t B, int64_t D, int64_t Tn, int64_t k, double tol, bool stop_rel) {
  if (mem < 1) throw pybind11::value_error("broyden_step_cpu: mem must be >= 1");
  if (k < 0 || k >= Tn) throw pybind11::value_error("broyden_step_cpu: k out of range of trace");
  using deq::bf16_t;
  using deq::half_t;
#define GETFAST_BROYDEN_STEP(T)                                                                     \
  broyden_step_impl<T>(ptr<T>(x), ptr<const T>(fx), ptr<T>(U), ptr<T>(V), ptr<T>(gprev), ptr<T>(dx), \
                       ptr<T>(best), ptr<deq::Io<T>::acc>(lowest), ptr<deq::Io<T>::acc>(trace),     \
                       ptr<int32_t>(status), mem, B, D, Tn, k, tol, stop_rel)
  switch (dtype) {
    case 0: GETFAST_BROYDEN_STEP(float); break;
    case 1: GETFAST_BROYDEN_STEP(double); break;
    case 2: GETFAST_BROYDEN_STEP(half_t); break;
    case 3: GETFAST_BROYDEN_STEP(bf16_t); break;
    default: throw pybind11::value_error("broyden_step_cpu: unknown dtype code");
  }
#undef GETFAST_BROYDEN_STEP
}

}  // namespace
}  // namespace getfast

GETFAST_BIND(broyden) {
  namespace py = pybind11;
  using namespace py::literals;
  m.def("broyden_lowrank_cpu", &getfast::broyden_lowrank_cpu, "dtype"_a, "A"_a, "Bm"_a, "x"_a,
        "out"_a, "n"_a, "B"_a, "D"_a,
        "out = -x + sum_j Bm_j <A_j, x> per sample on CPU (Broyden matvec/rmatvec).",
        py::call_guard<py::gil_scoped_release>());
  m.def("broyden_step_cpu", &getfast::broyden_step_cpu, "dtype"_a, "x"_a, "fx"_a, "U"_a, "V"_a,
        "g_prev"_a, "dx"_a, "best"_a, "lowest"_a, "trace"_a, "status"_a, "mem"_a, "B"_a, "D"_a,
        "T"_a, "k"_a, "tol"_a, "stop_rel"_a,
        "Fused Broyden iteration on CPU (buffers as data pointers; see getfast/ops/broyden.py).",
        py::call_guard<py::gil_scoped_release>());
#ifdef GETFAST_WITH_CUDA
  m.def(
      "broyden_step_cuda",
      [](int dtype, std::uintptr_t x, std::uintptr_t fx, std::uintptr_t U, std::uintptr_t V,
         std::uintptr_t gprev, std::uintptr_t dx, std::uintptr_t best, std::uintptr_t lowest,
         std::uintptr_t trace, std::uintptr_t status, int64_t mem, int64_t B, int64_t D, int64_t Tn,
         int64_t k, double tol, bool stop_rel, std::uintptr_t work, std::uintptr_t stream) {
        if (const char* err = getfast::broyden_step_cuda(dtype, x, fx, U, V, gprev, dx, best, lowest,
                                                         trace, status, mem, B, D, Tn, k, tol,
                                                         stop_rel, work, stream))
          throw std::runtime_error(std::string("broyden_step_cuda: ") + err);
      },
      "dtype"_a, "x"_a, "fx"_a, "U"_a, "V"_a, "g_prev"_a, "dx"_a, "best"_a, "lowest"_a, "trace"_a,
      "status"_a, "mem"_a, "B"_a, "D"_a, "T"_a, "k"_a, "tol"_a, "stop_rel"_a, "work"_a, "stream"_a,
      "Fused Broyden iteration on CUDA, launched on `stream` (see getfast/ops/broyden.py).");
  m.def(
      "broyden_lowrank_cuda",
      [](int dtype, std::uintptr_t Am, std::uintptr_t Bm, std::uintptr_t x, std::uintptr_t out,
         int64_t n, int64_t B, int64_t D, std::uintptr_t work, std::uintptr_t stream) {
        if (const char* err = getfast::broyden_lowrank_cuda(dtype, Am, Bm, x, out, n, B, D, work, stream))
          throw std::runtime_error(std::string("broyden_lowrank_cuda: ") + err);
      },
      "dtype"_a, "A"_a, "Bm"_a, "x"_a, "out"_a, "n"_a, "B"_a, "D"_a, "work"_a, "stream"_a,
      "out = -x + sum_j Bm_j <A_j, x> per sample on CUDA, launched on `stream`.");
#endif
}
