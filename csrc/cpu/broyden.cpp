// Broyden low-rank inverse-Jacobian products on CPU (Broyden 1965; Bai et al. 2019).
// Contract and reference: getfast/ops/broyden.py. One function serves both products:
//   out_b = -x_b + sum_{j<n} Bm[j, b] * <A[j, b], x_b>
// with (A, Bm) = (V, U) for (-I + U V^T) x and (U, V) for x^T (-I + U V^T).
// Per sample: pass 1 computes the n dots (one read of A), pass 2 the expansion (one read of Bm).
// Parallel over samples when there are at least as many as threads, else over D blocks.
#include <algorithm>
#include <cstdint>
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

}  // namespace
}  // namespace getfast

GETFAST_BIND(broyden) {
  namespace py = pybind11;
  using namespace py::literals;
  m.def("broyden_lowrank_cpu", &getfast::broyden_lowrank_cpu, "dtype"_a, "A"_a, "Bm"_a, "x"_a,
        "out"_a, "n"_a, "B"_a, "D"_a,
        "out = -x + sum_j Bm_j <A_j, x> per sample on CPU (Broyden matvec/rmatvec).",
        py::call_guard<py::gil_scoped_release>());
#ifdef GETFAST_WITH_CUDA
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
