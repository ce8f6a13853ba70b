// Host launchers for the SIM surrogate CUDA kernels (csrc/cuda/sim_loss.cu). Plain C++, no
// CUDA headers: pointers, sizes and the cudaStream_t are passed as integers. Each returns
// nullptr on success or a CUDA error string.
//
// dtype codes (getfast/ops/_framework.py DTYPE_CODES): 0 float32, 1 float64, 2 float16,
// 3 bfloat16. Inputs a, f, g are (B, N) of that dtype; sigma, loss (B) and stats (B, 2) are
// float64 for dtype 1 and float32 otherwise; grads have the input dtype.
#pragma once

#include <cstdint>

namespace getfast {

const char* sim_loss_fwd_cuda(int dtype, std::uintptr_t a, std::uintptr_t f, std::uintptr_t g,
                              std::uintptr_t sigma, double c, int64_t B, int64_t N,
                              std::uintptr_t loss, std::uintptr_t stats, std::uintptr_t stream);

const char* sim_loss_bwd_cuda(int dtype, std::uintptr_t grad, std::uintptr_t a, std::uintptr_t f,
                              std::uintptr_t g, std::uintptr_t sigma, std::uintptr_t stats,
                              int64_t B, int64_t N, std::uintptr_t grad_a, std::uintptr_t grad_f,
                              std::uintptr_t grad_g, std::uintptr_t stream);

}  // namespace getfast
