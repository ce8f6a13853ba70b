// The native interface of getfast._C, in plain C++ (no torch, pybind11 or CUDA headers).
//
// Every kernel entry point has one shape: a dtype code (0 float32, 1 float64, 2 float16,
// 3 bfloat16; getfast/ops/_framework.py DTYPE_CODES), the tensors' data pointers, the integer
// sizes and the real scalars, in the order the op's Python launcher documents; CUDA entry points
// also take the caller's stream (cudaStream_t as an integer) and return nullptr or a CUDA error
// string. Python validates dtype, device, shape and contiguity before any pointer gets here.
#pragma once

#include <cstdint>
#include <vector>

namespace getfast {

using Ptrs = std::vector<std::uintptr_t>;
using Ints = std::vector<std::int64_t>;
using Reals = std::vector<double>;

template <typename T>
inline T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

using CudaEntry = const char* (*)(int dtype, const Ptrs&, const Ints&, const Reals&, std::uintptr_t stream);
const char* sim_loss_fwd_cuda(int, const Ptrs&, const Ints&, const Reals&, std::uintptr_t);
const char* sim_loss_bwd_cuda(int, const Ptrs&, const Ints&, const Reals&, std::uintptr_t);
const char* anderson_step_cuda(int, const Ptrs&, const Ints&, const Reals&, std::uintptr_t);
const char* broyden_step_cuda(int, const Ptrs&, const Ints&, const Reals&, std::uintptr_t);

int cuda_device_count();     // 0 without a driver or device (never throws)
int cuda_runtime_version();  // cudart version compiled in, e.g. 13000

}  // namespace getfast
