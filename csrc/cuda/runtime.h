// Host-side CUDA runtime helpers, implemented in runtime.cu. Safe to include from plain C++:
// no CUDA headers here.
#pragma once

#include <cstdint>

namespace getfast {
// Number of devices, 0 when no driver/device is present (never throws).
int cuda_device_count();
// cudart version compiled in (e.g. 13000).
int cuda_runtime_version();
// nullptr when the last launch succeeded, else a static error string (clears the error).
const char* cuda_last_error();
}  // namespace getfast
