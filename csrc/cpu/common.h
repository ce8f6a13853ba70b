// Helpers shared by the CPU kernels: float16/bfloat16 storage conversions (round-to-nearest-even,
// as torch), load/store traits mapping a storage type to its accumulation type (double for
// double, float otherwise) and the dtype-code dispatch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace getfast {
namespace cpu {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t out;
  if (exp == 0) {
    if (mant == 0) {
      out = sign;
    } else {  // subnormal: mant * 2^-24, exact in float
      const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
      uint32_t vb;
      std::memcpy(&vb, &v, 4);
      out = sign | vb;
    }
  } else if (exp == 31) {
    out = sign | 0x7F800000u | (mant << 13);
  } else {
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 -> inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    float af;
    std::memcpy(&af, &ax, 4);
    const uint32_t r = static_cast<uint32_t>(std::nearbyint(af * 16777216.0f));  // RNE
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t mant = ax & 0x7FFFFFu;
  uint32_t h = (((ax >> 23) - 112u) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1u;
  return static_cast<uint16_t>(sign | h);
}

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
struct Io;
template <>
struct Io<float> {
  using acc = float;
  static inline float ld(float v) { return v; }
  static inline float st(float a) { return a; }
};
template <>
struct Io<double> {
  using acc = double;
  static inline double ld(double v) { return v; }
  static inline double st(double a) { return a; }
};
template <>
struct Io<half_t> {
  using acc = float;
  static inline float ld(half_t v) { return f16_to_f32(v.bits); }
  static inline half_t st(float a) { return half_t{f32_to_f16(a)}; }
};
template <>
struct Io<bf16_t> {
  using acc = float;
  static inline float ld(bf16_t v) { return bf16_to_f32(v.bits); }
  static inline bf16_t st(float a) { return bf16_t{f32_to_bf16(a)}; }
};

// Elements per cache block for the two-pass loops (fits L1 with a few history streams).
constexpr int64_t kBlock = 512;

// Calls f(T{}) with the storage type of the dtype code (ValueError in Python for a bad code).
template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(double{}); break;
    case 2: f(half_t{}); break;
    case 3: f(bf16_t{}); break;
    default: throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
  }
}

// The per-sample stopping rule every solver step shares, from ss_g = |g|^2 and ss_f = |f(x)|^2: absolute and
// relative residual; trace column k (a frozen sample reports its lowest residuals if converged, inf if
// non-finite: torchdeq-style padding); for a running sample the lowest residuals and their step, and the status
// (1 converged: lowest < tol, 2 non-finite). Returns whether the sample still runs after this step; *improved:
// whether this iterate is the new lowest (its candidate becomes the best).
template <class A, class S>
inline bool residual_bookkeeping(S ss_g, S ss_f, A rel_eps, double tol_d, bool stop_rel, int64_t b, int64_t B,
                                 int64_t Tn, int64_t k, A* lowest, A* trace, int32_t* status, bool* improved) {
  const A inf = std::numeric_limits<A>::infinity();
  A abs_r = static_cast<A>(std::sqrt(static_cast<A>(ss_g)));
  const A f_norm = static_cast<A>(std::sqrt(static_cast<A>(ss_f)));
  const bool finite = std::isfinite(abs_r) && std::isfinite(f_norm);
  const A rel_r = finite ? abs_r / (f_norm + rel_eps) : inf;
  if (!finite) abs_r = inf;
  const int32_t st0 = status[b];
  const bool running = st0 == 0;
  trace[b * Tn + k] = running ? abs_r : (st0 == 1 ? lowest[b] : inf);
  trace[(B + b) * Tn + k] = running ? rel_r : (st0 == 1 ? lowest[B + b] : inf);
  *improved = false;
  int32_t st1 = st0;
  if (running) {
    *improved = (stop_rel ? rel_r : abs_r) < (stop_rel ? lowest[B + b] : lowest[b]);
    lowest[b] = std::min(lowest[b], abs_r);
    lowest[B + b] = std::min(lowest[B + b], rel_r);
    if (*improved) lowest[2 * B + b] = static_cast<A>(k + 1);
    const A new_lo = stop_rel ? lowest[B + b] : lowest[b];
    if (!finite) st1 = 2;
    else if (tol_d >= 0.0 && new_lo < static_cast<A>(tol_d)) st1 = 1;
    status[b] = st1;
  }
  return st1 == 0;
}

}  // namespace cpu
}  // namespace getfast
