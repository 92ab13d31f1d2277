// Software minifloat conversion (fp8 e4m3fn / e5m2 / e4m3fnuz / e5m2fnuz, and the 4-bit element formats of
// float4.h): float32 <-> code bits by integer manipulation plus one fp32 add, identical on CPU and GPU.
//
// Numerics (the specification is qkernels/reference/float8.py; keep both in step):
//  * round to nearest, ties to even, on the exact fp32 input (fp16/bf16 inputs widen to fp32 exactly first);
//  * subnormal targets are produced with the "magic number" add: a + 2^(emin - M + 23) rounds |a| to a multiple of
//    the target's subnormal spacing 2^(emin - M) in the FPU's default round-to-nearest-even mode;
//  * overflow (the rounded magnitude exceeds the largest finite code, or the input is +-inf):
//      saturate=true  -> +-max finite (OCP FP8 spec "saturating" conversion; NVIDIA's __NV_SATFINITE)
//      saturate=false -> +-inf where the format has inf (e5m2), NaN otherwise (e4m3fn, fnuz), as ml_dtypes does;
//    the 4-bit element formats have neither inf nor NaN and always saturate;
//  * NaN -> the format's NaN (0x7F|sign for e4m3fn and e5m2, 0x80 for fnuz); formats without NaN get the -0 code,
//    matching ml_dtypes.float4_e2m1fn;
//  * fnuz formats have no -0: a result that rounds to zero is +0 (0x80 is their only NaN).
// Formats: OCP 8-bit Floating Point Specification (OFP8) rev 1.0, 2023 (e4m3fn, e5m2);
// Graphcore/AMD "fnuz" variants (exponent bias one larger, single NaN at 0x80; used by MI300 / gfx942).
#pragma once
#include <cstdint>
#include <cstring>

#include "qkernels/macros.h"

namespace qkernels {

struct MiniFloat {
  int ebits;          // exponent bits
  int mbits;          // mantissa bits
  int bias;           // exponent bias; subnormals have exponent field 0 and scale 2^(1 - bias)
  bool has_inf;       // IEEE inf at exponent all-ones, mantissa 0 (e5m2); mantissa != 0 there is NaN
  bool fnuz;          // 0x80 is the only NaN; no -0, no inf
  bool has_nan;       // false for the 4-bit element formats
  uint32_t max_code;  // magnitude bits of the largest finite value
};

// Format ids shared with the Python side (qkernels/reference/float8.py: FORMAT_IDS).
enum MiniFloatId : int { kE4M3FN = 0, kE5M2 = 1, kE4M3FNUZ = 2, kE5M2FNUZ = 3, kE2M1 = 4, kE1M2 = 5 };

QK_HD MiniFloat minifloat_format(int id) {
  switch (id) {
    case kE4M3FN: return MiniFloat{4, 3, 7, false, false, true, 0x7E};      // max 448
    case kE5M2: return MiniFloat{5, 2, 15, true, false, true, 0x7B};        // max 57344
    case kE4M3FNUZ: return MiniFloat{4, 3, 8, false, true, true, 0x7F};     // max 240
    case kE5M2FNUZ: return MiniFloat{5, 2, 16, false, true, true, 0x7F};    // max 57344
    case kE2M1: return MiniFloat{2, 1, 1, false, false, false, 0x7};        // max 6
    default: return MiniFloat{1, 2, 0, false, false, false, 0x7};           // kE1M2, max 3.5
  }
}

QK_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

QK_HD float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

QK_HD uint8_t minifloat_nan_code(const MiniFloat& f, uint32_t sign) {
  if (f.fnuz) return 0x80;
  if (!f.has_nan) return (uint8_t)(1u << (f.ebits + f.mbits));  // -0, as ml_dtypes encodes NaN in e2m1
  return (uint8_t)((sign << (f.ebits + f.mbits)) | ((1u << (f.ebits + f.mbits)) - 1));  // all ones
}

QK_HD uint8_t float_to_minifloat(float v, const MiniFloat& f, bool saturate) {
  const uint32_t u = f32_bits(v);
  const uint32_t sign = u >> 31;
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return minifloat_nan_code(f, sign);
  const int M = f.mbits;
  const uint32_t min_normal = (uint32_t)(127 + 1 - f.bias) << 23;  // 2^emin, emin = 1 - bias
  uint32_t code;
  if (a >= 0x7F800000u) {
    code = f.max_code + 1;  // inf: take the overflow branch below
  } else if (a < min_normal) {
    const float magic = bits_f32((uint32_t)(127 + 1 - f.bias - M + 23) << 23);
    code = f32_bits(bits_f32(a) + magic) - f32_bits(magic);  // may round up to the smallest normal: still right
  } else {
    a += ((1u << (22 - M)) - 1) + ((a >> (23 - M)) & 1u);  // round half to even on the dropped bits
    code = (a >> (23 - M)) - ((uint32_t)(127 - f.bias) << M);
  }
  if (code > f.max_code) {
    if (saturate || !f.has_nan) {
      code = f.max_code;
    } else if (f.has_inf) {
      code = ((1u << f.ebits) - 1) << M;
    } else {
      return minifloat_nan_code(f, sign);
    }
  }
  if (f.fnuz && code == 0) return 0;
  return (uint8_t)((sign << (f.ebits + M)) | code);
}

QK_HD float minifloat_to_float(uint32_t c, const MiniFloat& f) {
  const int M = f.mbits;
  const uint32_t nbits = f.ebits + M;
  c &= (1u << (nbits + 1)) - 1;
  const uint32_t sign = (c >> nbits) & 1u;
  const uint32_t mag = c & ((1u << nbits) - 1);
  const uint32_t exp = mag >> M, mant = mag & ((1u << M) - 1);
  const uint32_t exp_ones = (1u << f.ebits) - 1;
  if (f.fnuz) {
    if (c == 0x80) return bits_f32(0x7FC00000u);
  } else if (f.has_inf) {
    if (exp == exp_ones) return bits_f32((sign << 31) | (mant ? 0x7FC00000u : 0x7F800000u));
  } else if (f.has_nan && mag == (1u << nbits) - 1) {
    return bits_f32((sign << 31) | 0x7FC00000u);
  }
  float r;
  if (exp == 0) {
    r = (float)mant * bits_f32((uint32_t)(127 + 1 - f.bias - M) << 23);  // mant * 2^(emin - M), exact
  } else {
    r = bits_f32(((exp + 127 - f.bias) << 23) | (mant << (23 - M)));
  }
  return sign ? -r : r;
}

QK_HD float minifloat_max(const MiniFloat& f) { return minifloat_to_float(f.max_code, f); }

// Finite-value magnitude used for scales: NaN and +-inf do not contribute (they are encoded on their own).
QK_HD float finite_abs(float v) {
  const uint32_t a = f32_bits(v) & 0x7FFFFFFFu;
  return a < 0x7F800000u ? bits_f32(a) : 0.f;
}

// scale = amax / fp8_max, with 1 where that is 0 (all-zero block): nothing divides by zero and zeros stay zero.
QK_HD float fp8_scale_from_amax(float amax, float fmax) {
  const float s = amax / fmax;
  return s > 0.f ? s : 1.f;
}

}  // namespace qkernels
