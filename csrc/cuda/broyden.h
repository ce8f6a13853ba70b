// Host launcher for the Broyden low-rank products on CUDA (csrc/cuda/broyden.cu). Plain C++, no
// CUDA headers. out_b = -x_b + sum_{j<n} Bm[j, b] <A[j, b], x_b>, with A, Bm (mem, B, D) and x, out
// (B, D) of dtype code 0 float32, 1 float64, 2 float16, 3 bfloat16. `work` (float64 for code 1,
// float32 otherwise) holds broyden_workspace_numel(B, D, n) elements. Returns nullptr on success
// or a CUDA error string. Contract: getfast/ops/broyden.py.
#pragma once

#include <cstdint>

namespace getfast {

inline int64_t broyden_blocks_per_sample(int64_t D) {
  int64_t nblk = (D + 4095) / 4096;
  if (nblk < 1) nblk = 1;
  if (nblk > 256) nblk = 256;
  return nblk;
}

inline int64_t broyden_workspace_numel(int64_t B, int64_t D, int64_t n) {
  const int64_t w = B * broyden_blocks_per_sample(D) * n;
  return w > 0 ? w : 1;
}

const char* broyden_lowrank_cuda(int dtype, std::uintptr_t A, std::uintptr_t Bm, std::uintptr_t x,
                                 std::uintptr_t out, int64_t n, int64_t B, int64_t D,
                                 std::uintptr_t work, std::uintptr_t stream);

// Fused Broyden iteration (getfast::broyden_step). Buffers: x, fx, g_prev, dx, best (B, D) and
// U, V (mem, B, D) of the dtype code; lowest (3, B), trace (2, B, T) float64 for code 1 else
// float32; status (B,) int32. `work` holds broyden_step_workspace_numel(mem, B, D) elements.
inline int64_t broyden_step_workspace_numel(int64_t mem, int64_t B, int64_t D) {
  return B * broyden_blocks_per_sample(D) * (3 * mem + 4) + B * (3 * mem + 4);
}

const char* broyden_step_cuda(int dtype, std::uintptr_t x, std::uintptr_t fx, std::uintptr_t U,
                              std::uintptr_t V, std::uintptr_t gprev, std::uintptr_t dx,
                              std::uintptr_t best, std::uintptr_t lowest, std::uintptr_t trace,
                              std::uintptr_t status, int64_t mem, int64_t B, int64_t D, int64_t T,
                              int64_t k, double tol, bool stop_rel, std::uintptr_t work,
                              std::uintptr_t stream);

}  // namespace getfast
