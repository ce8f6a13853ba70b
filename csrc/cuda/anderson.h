// Host launcher for the fused Anderson step on CUDA (csrc/cuda/anderson.cu). Plain C++, no CUDA
// headers: pointers, sizes and the cudaStream_t are integers. Returns nullptr on success or a
// CUDA error string. Contract and buffer layouts: getfast/ops/anderson.py.
//
// dtype codes (getfast/ops/_framework.py DTYPE_CODES): 0 float32, 1 float64, 2 float16,
// 3 bfloat16 for X, G, fx, best; H, lowest, trace and the workspace are float64 for code 1 and
// float32 otherwise; status is int32. `work` holds anderson_workspace_numel(m, B, D) elements.
#pragma once

#include <cstdint>

namespace getfast {

// Blocks per sample for the two streaming kernels (mirrored in getfast/ops/anderson.py).
inline int64_t anderson_blocks_per_sample(int64_t D) {
  int64_t nblk = (D + 4095) / 4096;
  if (nblk < 1) nblk = 1;
  if (nblk > 1024) nblk = 1024;
  return nblk;
}

inline int64_t anderson_workspace_numel(int64_t m, int64_t B, int64_t D) {
  return B * anderson_blocks_per_sample(D) * (m + 2) + B * (m + 1);
}

const char* anderson_step_cuda(int dtype, std::uintptr_t X, std::uintptr_t G, std::uintptr_t H,
                               std::uintptr_t fx, std::uintptr_t best, std::uintptr_t lowest,
                               std::uintptr_t trace, std::uintptr_t status, int64_t m, int64_t B,
                               int64_t D, int64_t T, int64_t k, double tau, double lam, double tol,
                               bool stop_rel, double rtol, std::uintptr_t work,
                               std::uintptr_t stream);

}  // namespace getfast
