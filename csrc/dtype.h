// Element conversions of the wire and output types, written once for the host backend, the
// reference and the CUDA kernels (__host__ __device__), so every path rounds the same way:
// round-to-nearest-even everywhere; fp8 e4m3 (the "fn" variant: no infinities, max 448) saturates
// finite values and infinities and turns any NaN into the canonical 0x7f, like
// __nv_cvt_float_to_fp8(..., __NV_SATFINITE, __NV_E4M3).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "csrc/plan.h"

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#endif

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
// On GPUs with fp8 conversion instructions (sm_89 and later) the device uses them: cvt.rn.satfinite
// is specified as exactly the software path below (nearest, ties to even, +-448 beyond range, NaN
// kept), which the host tests check against a brute-force nearest search.
FERRY_HD uint8_t f32_to_fp8e4m3(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  return uint8_t(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3));
#else
  // On the bits, without libm or branches, so that the host backend's loop over a token vectorizes.
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  // Below 2^-6 the value is a multiple of 2^-9: a * 512 is exact, and adding and taking away 2^23
  // rounds it to an integer, ties to even (clamped first so the conversion stays in range).
  const float scaled = f32_from_bits(a < 0x3c800000u ? a : 0x3c800000u) * 512.0f;
  const uint32_t subnormal = uint32_t(int((scaled + 8388608.0f) - 8388608.0f));
  // Otherwise keep 3 of the 23 mantissa bits, rounding to nearest even; a carry moves into the
  // exponent (below 448 it never reaches the NaN code 0x7f).
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t normal = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
  const uint32_t code = a >= 0x43e00000u ? 0x7eu : a < 0x3c800000u ? subnormal : normal;  // >= 448: saturate
  return uint8_t(a > 0x7f800000u ? 0x7fu : sign | code);  // NaN: the canonical 0x7f, as cvt gives it
#endif
}
// Two at once: the low byte is `a`'s (one instruction on the device).
FERRY_HD uint16_t f32x2_to_fp8e4m3x2(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  return uint16_t(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
#else
  return uint16_t(f32_to_fp8e4m3(a) | (uint16_t(f32_to_fp8e4m3(b)) << 8));
#endif
}

// ---- quantize on dispatch (ferry.h, ferry_quantize_t) ----------------------------------------------
// The block math every path shares: the host backend's pack, the CUDA pack kernel. The reference
// (csrc/reference.cpp) computes the same numbers its own way.
constexpr float kFp8E4M3Max = 448.0f;
constexpr float kFp8E4M3MaxInv = 1.0f / 448.0f;
constexpr float kQuantizeAmaxFloor = 1e-4f;  // FERRY_QUANTIZE_AMAX_FLOOR

// What one element contributes to its block's amax: |x|, or 0 for NaN and infinities (they do not
// set the scale; they saturate or stay NaN when cast).
FERRY_HD float amax_term(float x) {
  const float a = fabsf(x);
  return a <= 3.40282347e+38f ? a : 0.0f;
}

struct BlockScale {
  float scale;       // travels with the token: q * scale approximates x
  float multiplier;  // x * multiplier is cast to fp8
};

// `amax`: the block's largest amax_term (any value; the floor is applied here).
FERRY_HD BlockScale fp8_block_scale(float amax, bool round_scale) {
  amax = amax > kQuantizeAmaxFloor ? amax : kQuantizeAmaxFloor;
  const float s = amax * kFp8E4M3MaxInv;
  if (!round_scale) return {s, kFp8E4M3Max / amax};
  // s is a normal float here (amax in [1e-4, bf16 max]): its exponent, plus one unless s is a power
  // of two, is the least e with 2^e >= s; e stays within [-22, 120].
  const uint32_t bits = f32_bits(s);
  const int e = int((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
  return {f32_from_bits(uint32_t(127 + e) << 23), f32_from_bits(uint32_t(127 - e) << 23)};
}

// The UE8M0 form of a scale: its biased exponent byte (ferry.h, FERRY_SCALE_UE8M0_COLUMN_MAJOR).
FERRY_HD uint8_t ue8m0_of(float scale) { return uint8_t((f32_bits(scale) >> 23) & 0xffu); }

// Slot s of a row of out_expert_x_scale, at Layout::out_scale_offset: the fp32 scale, or its UE8M0
// byte. Padding rows and the bytes that fill a UE8M0 word take scale 0 (stored as 0 either way).
FERRY_HD void store_out_scale(void* out, int scale_layout, uint64_t offset, float scale) {
  auto* bytes = static_cast<uint8_t*>(out) + offset;
  if (scale_layout == kScaleUe8m0ColumnMajor) *bytes = ue8m0_of(scale);
  else *reinterpret_cast<float*>(bytes) = scale;  // f32 layouts: offsets are multiples of 4
}

// One block of n bf16 elements: q (n bytes of fp8) and its scale.
FERRY_HD float quantize_block(const uint16_t* x, int n, bool round_scale, uint8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float a = amax_term(bf16_to_f32(x[i]));
    amax = a > amax ? a : amax;
  }
  const BlockScale bs = fp8_block_scale(amax, round_scale);
  for (int i = 0; i < n; ++i) q[i] = f32_to_fp8e4m3(bf16_to_f32(x[i]) * bs.multiplier);
  return bs.scale;
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
