// CUDA runtime queries for module.cpp (compiled only when GETFAST_WITH_CUDA).
#include <cuda_runtime.h>

#include "../ops.h"

namespace getfast {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls start clean
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace getfast
