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

}  // namespace getfast
