// getfast._C entry point: build information plus every family registered with GETFAST_BIND.
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "registry.h"
#include "cuda/runtime.h"

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

static std::vector<int> parse_archs() {
  std::vector<int> out;
#ifdef GETFAST_CUDA_ARCHS
  std::string s = GETFAST_CUDA_ARCHS;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    std::string tok = s.substr(start, end - start);
    std::string digits;
    for (char ch : tok)
      if (ch >= '0' && ch <= '9') digits.push_back(ch);
      else if (ch == '-') break;  // "90-real" / "90-virtual"
    if (!digits.empty()) out.push_back(std::stoi(digits));
    start = end + 1;
  }
#endif
  return out;
}

static std::vector<std::string> families() {
  std::vector<std::string> names;
  for (const auto& e : bind_registry()) names.emplace_back(e.family);
  return names;
}

}  // namespace getfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "getfast native kernels (C++/OpenMP and CUDA; no libtorch)";

  m.def("build_info", [] {
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
    d["families"] = getfast::families();
    return d;
  }, "Dict describing how this extension was built.");

  m.def("cuda_device_count", [] {
#ifdef GETFAST_WITH_CUDA
    return getfast::cuda_device_count();
#else
    return 0;
#endif
  }, "Number of visible CUDA devices; 0 without CUDA support, a driver or a device.");

  auto& reg = getfast::bind_registry();
  std::sort(reg.begin(), reg.end(), [](const getfast::BindEntry& a, const getfast::BindEntry& b) {
    return std::strcmp(a.family, b.family) < 0;
  });
  for (const auto& e : reg) e.fn(m);
}
