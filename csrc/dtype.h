// Element conversions of the wire and output types, written once for the host backend, the
// reference and the CUDA kernels (__host__ __device__), so every path rounds the same way:
// round-to-nearest-even everywhere; fp8 e4m3 (the "fn" variant: no infinities, max 448) saturates
// finite values, like __nv_cvt_float_to_fp8(..., __NV_SATFINITE, __NV_E4M3).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "csrc/plan.h"

namespace ferry::ep::dtype {

constexpr int kBf16 = 0, kF16 = 1, kF32 = 2, kFp8E4M3 = 3;  // ferry_dtype_t values

FERRY_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
FERRY_HD float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

FERRY_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }
FERRY_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN, sign kept
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

FERRY_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float v = ldexpf(float(mant), -24);
    return sign ? -v : v;
  }
  return f32_from_bits(sign | (uint32_t(exp - 15 + 127) << 23) | (mant << 13));
}
FERRY_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = fabsf(f);
  if (a != a) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);  // rounds past the largest finite (65504)
  if (a < 6.103515625e-05f) {                          // below 2^-14: subnormal (m == 1024 is 2^-14)
    return uint16_t(sign | uint16_t(rintf(a * 16777216.0f)));
  }
  int e2;
  const float m = frexpf(a, &e2);  // a = m * 2^e2, m in [0.5, 1)
  int e = e2 - 1;
  int mant = int(rintf((m * 2.0f - 1.0f) * 1024.0f));
  if (mant == 1024) { mant = 0; ++e; }
  return uint16_t(sign | uint16_t((e + 15) << 10) | uint16_t(mant));
}

FERRY_HD float fp8e4m3_to_f32(uint8_t b) {
  const bool neg = b & 0x80;
  const int exp = (b >> 3) & 0xf;
  const int mant = b & 0x7;
  float v;
  if (exp == 0xf && mant == 0x7) v = NAN;
  else if (exp == 0) v = ldexpf(float(mant), -9);
  else v = ldexpf(1.0f + float(mant) / 8.0f, exp - 7);
  return neg ? -v : v;
}
FERRY_HD uint8_t f32_to_fp8e4m3(float f) {
  const uint8_t sign = uint8_t((f32_bits(f) >> 24) & 0x80u);
  float a = fabsf(f);
  if (a != a) return uint8_t(sign | 0x7f);
  if (a > 448.0f) a = 448.0f;
  if (a < 0.015625f) return uint8_t(sign | uint8_t(rintf(a * 512.0f)));  // subnormal, 2^-6 > a
  int e2;
  const float m = frexpf(a, &e2);
  int e = e2 - 1;
  int mant = int(rintf((m * 2.0f - 1.0f) * 8.0f));
  if (mant == 8) { mant = 0; ++e; }
  return uint8_t(sign | uint8_t((e + 7) << 3) | uint8_t(mant));
}

// Element i of a row of `type`.
FERRY_HD float load(const void* row, int type, int64_t i) {
  switch (type) {
    case kBf16: return bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
    case kF32: return static_cast<const float*>(row)[i];
    default: return fp8e4m3_to_f32(static_cast<const uint8_t*>(row)[i]);
  }
}
FERRY_HD void store(void* row, int type, int64_t i, float v) {
  switch (type) {
    case kBf16: static_cast<uint16_t*>(row)[i] = f32_to_bf16(v); break;
    case kF16: static_cast<uint16_t*>(row)[i] = f32_to_f16(v); break;
    case kF32: static_cast<float*>(row)[i] = v; break;
    default: static_cast<uint8_t*>(row)[i] = f32_to_fp8e4m3(v); break;
  }
}
// The value `v` becomes once stored as `type`.
FERRY_HD float round_to(int type, float v) {
  switch (type) {
    case kBf16: return bf16_to_f32(f32_to_bf16(v));
    case kF16: return f16_to_f32(f32_to_f16(v));
    case kF32: return v;
    default: return fp8e4m3_to_f32(f32_to_fp8e4m3(v));
  }
}

// Whole rows, with the type switch hoisted out of the element loop (the host backend's hot loops).
// acc[i] += w * row[i] for i < n.
FERRY_HD void axpy_row(float* acc, const void* row, int type, float w, int64_t n) {
  switch (type) {
    case kBf16: {
      const auto* p = static_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) acc[i] += w * bf16_to_f32(p[i]);
      break;
    }
    case kF16: {
      const auto* p = static_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) acc[i] += w * f16_to_f32(p[i]);
      break;
    }
    case kF32: {
      const auto* p = static_cast<const float*>(row);
      for (int64_t i = 0; i < n; ++i) acc[i] += w * p[i];
      break;
    }
    default: {
      const auto* p = static_cast<const uint8_t*>(row);
      for (int64_t i = 0; i < n; ++i) acc[i] += w * fp8e4m3_to_f32(p[i]);
      break;
    }
  }
}
FERRY_HD void load_row(float* out, const void* row, int type, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
  axpy_row(out, row, type, 1.0f, n);
}
FERRY_HD void store_row(void* row, int type, const float* v, int64_t n) {
  switch (type) {
    case kBf16: {
      auto* p = static_cast<uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(v[i]);
      break;
    }
    case kF16: {
      auto* p = static_cast<uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_f16(v[i]);
      break;
    }
    case kF32: {
      auto* p = static_cast<float*>(row);
      for (int64_t i = 0; i < n; ++i) p[i] = v[i];
      break;
    }
    default: {
      auto* p = static_cast<uint8_t*>(row);
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_fp8e4m3(v[i]);
      break;
    }
  }
}

}  // namespace ferry::ep::dtype
