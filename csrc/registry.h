// getfast._C binding registry: each kernel family registers its functions from its own .cpp
// file with GETFAST_BIND(family) { ... }, so adding a family never edits module.cpp or
// CMakeLists.txt (CMake globs csrc/**/*.cpp). module.cpp runs every registered function, sorted
// by family name, inside PYBIND11_MODULE.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "ops.h"

namespace getfast {

using BindFn = void (*)(pybind11::module_&);
struct BindEntry {
  const char* family;
  BindFn fn;
};
std::vector<BindEntry>& bind_registry();  // module.cpp (function-local static)
struct BindRegistrar {
  BindRegistrar(const char* family, BindFn fn) { bind_registry().push_back({family, fn}); }
};

// CPU entry points run without the GIL; CUDA entry points turn an error string into RuntimeError.
inline void def_cpu(pybind11::module_& m, const char* name,
                    void (*fn)(int, const Ptrs&, const Ints&, const Reals&)) {
  m.def(name, fn, pybind11::call_guard<pybind11::gil_scoped_release>());
}
inline void def_cuda(pybind11::module_& m, const char* name, CudaEntry fn) {
  m.def(name, [fn, name](int dtype, const Ptrs& p, const Ints& n, const Reals& r, std::uintptr_t stream) {
    if (const char* err = fn(dtype, p, n, r, stream)) throw std::runtime_error(std::string(name) + ": " + err);
  });
}

}  // namespace getfast

// The CUDA entry points exist only in a CUDA build.
#ifdef GETFAST_WITH_CUDA
#define GETFAST_DEF_CUDA(m, fn) ::getfast::def_cuda(m, #fn, &::getfast::fn)
#else
#define GETFAST_DEF_CUDA(m, fn) ((void)0)
#endif

#define GETFAST_BIND(family)                                                                   \
  static void getfast_bind_##family(pybind11::module_& m);                                     \
  static ::getfast::BindRegistrar getfast_bind_registrar_##family(#family, &getfast_bind_##family); \
  static void getfast_bind_##family(pybind11::module_& m)
