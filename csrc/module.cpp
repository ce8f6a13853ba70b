// getfast._C entry point: build information plus every family registered with GETFAST_BIND.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "registry.h"

#ifdef GETFAST_WITH_OPENMP
#include <omp.h>
#endif

#ifndef GETFAST_VERSION
#define GETFAST_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace getfast {

std::vector<BindEntry>& bind_registry() {
  static std::vector<BindEntry> entries;
  return entries;
}

// "80,90-real" (CMAKE_CUDA_ARCHITECTURES joined with ',') -> {80, 90}: each entry's leading digits.
static std::vector<int> parse_archs() {
  std::vector<int> out;
#ifdef GETFAST_CUDA_ARCHS
  const std::string s = GETFAST_CUDA_ARCHS;
  for (size_t i = 0; i < s.size();) {
    size_t j = i;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    if (j > i) out.push_back(std::stoi(s.substr(i, j - i)));
    const size_t comma = s.find(',', i);
    i = comma == std::string::npos ? s.size() : comma + 1;
  }
#endif
  return out;
}

}  // namespace getfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "getfast native kernels (C++/OpenMP and CUDA; no libtorch)";
  auto& reg = getfast::bind_registry();
  std::sort(reg.begin(), reg.end(), [](const getfast::BindEntry& a, const getfast::BindEntry& b) {
    return std::strcmp(a.family, b.family) < 0;
  });
  m.def("build_info", [&reg] {
    py::dict d;
    d["version"] = GETFAST_VERSION;
#ifdef GETFAST_WITH_CUDA
    d["cuda_compiled"] = true;
    d["cuda_runtime_version"] = getfast::cuda_runtime_version();
#else
    d["cuda_compiled"] = false;
    d["cuda_runtime_version"] = 0;
#endif
    d["cuda_archs"] = getfast::parse_archs();
#ifdef GETFAST_WITH_OPENMP
    d["openmp"] = true;
    d["omp_max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["omp_max_threads"] = 1;
#endif
    py::list families;
    for (const auto& e : reg) families.append(e.family);
    d["families"] = families;
    return d;
  }, "Dict describing how this extension was built.");
  m.def("cuda_device_count", [] {
#ifdef GETFAST_WITH_CUDA
    return getfast::cuda_device_count();
#else
    return 0;
#endif
  }, "Number of visible CUDA devices; 0 without CUDA support, a driver or a device.");
  for (const auto& e : reg) e.fn(m);
}
