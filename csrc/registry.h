// getfast._C binding registry.
//
// Each kernel family registers its pybind11 functions from its own .cpp file:
//
//   #include "registry.h"
//   GETFAST_BIND(sim_loss) {
//     m.def("sim_loss_fwd_cpu", &sim_loss_fwd_cpu, "...");
//   }
//
// The macro defines a static registrar object that appends the function to a global list
// before the module is initialised; csrc/module.cpp calls every registered function (sorted by
// family name, so the module's contents do not depend on link order) inside PYBIND11_MODULE.
// Adding a family therefore never edits module.cpp or CMakeLists.txt (CMake globs csrc/**/*.cpp).
//
// No torch headers anywhere in csrc/: functions take raw pointers (as uintptr_t), sizes and,
// for CUDA, the stream handle as uintptr_t.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace getfast {

using BindFn = void (*)(pybind11::module_&);

struct BindEntry {
  const char* family;
  BindFn fn;
};

// Defined in module.cpp (function-local static: no static-initialisation-order problem).
std::vector<BindEntry>& bind_registry();

struct BindRegistrar {
  BindRegistrar(const char* family, BindFn fn) { bind_registry().push_back({family, fn}); }
};

// Pointer helpers for bindings: Python passes tensor.data_ptr() as an int.
template <typename T>
inline T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace getfast

#define GETFAST_BIND(family)                                                          \
  static void getfast_bind_##family(pybind11::module_& m);                            \
  static ::getfast::BindRegistrar getfast_bind_registrar_##family(#family,            \
                                                                  &getfast_bind_##family); \
  static void getfast_bind_##family([[maybe_unused]] pybind11::module_& m)
