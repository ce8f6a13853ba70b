// Helpers shared by the CPU kernels: float16/bfloat16 storage conversions (round-to-nearest-even,
// as torch), load/store traits mapping a storage type to its accumulation type (double for
// double, float otherwise) and the dtype-code dispatch.
#pragma once

#include <cmath>
#include <cstdint>
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

}  // namespace cpu
}  // namespace getfast
