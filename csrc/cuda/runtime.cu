// Small CUDA runtime queries used by module.cpp (compiled only when GETFAST_WITH_CUDA).
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include "runtime.h"

namespace getfast {

int cuda_device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

const char* cuda_last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace getfast
#endif
