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
//  * NaN -> the format's NaN (0x7F|sign for e4m3fn and e5m2 as torch's casts give; ml_dtypes uses 0x7E|sign for
//    e5m2, also a NaN; 0x80 for fnuz); formats without NaN (fp4 elements) get the -0 code 0x8;
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

// Every format, one line each: X(enum key, id, name, ebits, mbits, bias, has_inf, fnuz, has_nan, max_code). The
// specification is the table in qkernels/reference/minifloat.py (FORMATS: the same ids, names and parameters); C++
// cannot read it, so tests/test_format_tables.py checks the kernels against it (every code of every format decodes
// to the table's value; the ops' error texts, generated from this list, name exactly the table's formats).
#define QK_MINIFLOATS(X)                                                                    \
  X(kE4M3FN, 0, "float8_e4m3fn", 4, 3, 7, false, false, true, 0x7E)     /* max 448 */   \
  X(kE5M2, 1, "float8_e5m2", 5, 2, 15, true, false, true, 0x7B)         /* max 57344 */ \
  X(kE4M3FNUZ, 2, "float8_e4m3fnuz", 4, 3, 8, false, true, true, 0x7F)  /* max 240 */   \
  X(kE5M2FNUZ, 3, "float8_e5m2fnuz", 5, 2, 16, false, true, true, 0x7F) /* max 57344 */ \
  X(kE2M1, 4, "e2m1", 2, 1, 1, false, false, false, 0x7)                /* max 6 */     \
  X(kE1M2, 5, "e1m2", 1, 2, 0, false, false, false, 0x7)                /* max 3.5 */

enum MiniFloatId : int {
#define QK_MINIFLOAT_ENUM(key, id, name, e, m, b, inf, fnuz, nan, maxc) key = id,
  QK_MINIFLOATS(QK_MINIFLOAT_ENUM)
#undef QK_MINIFLOAT_ENUM
  kNumMiniFloats
};

// An unknown id gives e1m2's parameters (not reached: ids come from the name / dtype checks of float_checks.h).
QK_HD MiniFloat minifloat_format(int id) {
  switch (id) {
#define QK_MINIFLOAT_CASE(key, id, name, e, m, b, inf, fnuz, nan, maxc) \
  case key: return MiniFloat{e, m, b, inf, fnuz, nan, maxc};
    QK_MINIFLOATS(QK_MINIFLOAT_CASE)
#undef QK_MINIFLOAT_CASE
    default: return MiniFloat{1, 2, 0, false, false, false, 0x7};
  }
}

// The format's name ("float8_e4m3fn", "e2m1") for host-side lookups and error texts; nullptr for an unknown id.
inline const char* minifloat_name(int id) {
  switch (id) {
#define QK_MINIFLOAT_NAME(key, id, name, e, m, b, inf, fnuz, nan, maxc) \
  case key: return name;
    QK_MINIFLOATS(QK_MINIFLOAT_NAME)
#undef QK_MINIFLOAT_NAME
    default: return nullptr;
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
  if (!f.has_nan) return (uint8_t)(1u << (f.ebits + f.mbits));  // -0 (formats without NaN: fp4 elements)
  return (uint8_t)((sign << (f.ebits + f.mbits)) | ((1u << (f.ebits + f.mbits)) - 1));  // all ones
}

// Loop-invariant constants of one (format, saturate) conversion, so the per-element code below is a handful of
// integer ops and selects with no branches: it vectorizes on CPU and does not diverge on GPU.
struct MiniFloatEncoder {
  uint32_t min_normal;  // fp32 bits of 2^emin: below it the result is subnormal
  uint32_t magic_bits;  // fp32 bits of 2^(emin - M + 23), the subnormal rounding constant
  uint32_t round_half;  // 2^(22 - M) - 1: with the kept LSB added, rounds the dropped bits half to even
  uint32_t shift;       // 23 - M
  uint32_t rebias;      // (127 - bias) << M: fp32 exponent field -> the format's
  uint32_t max_code;    // magnitude bits of the largest finite value
  uint32_t ovf_code;    // what an overflow becomes: max_code, the inf code, or 0xFFFFFFFF for NaN
  uint32_t nbits;       // position of the sign bit
  uint32_t nan_pos, nan_neg;
  uint32_t zero_mask;   // 0 for fnuz (a zero result drops the sign: 0x80 is NaN there), else 0xFF
};

QK_HD MiniFloatEncoder make_encoder(const MiniFloat& f, bool saturate) {
  MiniFloatEncoder e;
  const int M = f.mbits;
  e.min_normal = (uint32_t)(127 + 1 - f.bias) << 23;
  e.magic_bits = (uint32_t)(127 + 1 - f.bias - M + 23) << 23;
  e.round_half = (1u << (22 - M)) - 1;
  e.shift = 23 - M;
  e.rebias = (uint32_t)(127 - f.bias) << M;
  e.max_code = f.max_code;
  e.nbits = f.ebits + M;
  // formats without NaN (fp4 elements) always saturate
  const bool sat = saturate || !f.has_nan;
  e.ovf_code = sat ? f.max_code : (f.has_inf ? ((1u << f.ebits) - 1) << M : 0xFFFFFFFFu);
  e.nan_pos = minifloat_nan_code(f, 0);
  e.nan_neg = minifloat_nan_code(f, 1);
  e.zero_mask = f.fnuz ? 0u : 0xFFu;
  return e;
}

// all ones when b, else 0; selects as bit operations keep the conversion branch-free
QK_HD uint32_t qk_mask(bool b) { return 0u - (uint32_t)b; }
QK_HD uint32_t qk_select(uint32_t m, uint32_t x, uint32_t y) { return (x & m) | (y & ~m); }

QK_HD uint8_t minifloat_encode(float v, const MiniFloatEncoder& e) {
  const uint32_t u = f32_bits(v);
  const uint32_t sign = u >> 31;
  const uint32_t a = u & 0x7FFFFFFFu;
  // subnormal result: the fp32 add rounds |v| to a multiple of the subnormal spacing (RNE); the difference of the
  // bit patterns is the code, and rounding up to 2^emin gives exactly the smallest normal's code
  const uint32_t sub = f32_bits(bits_f32(a) + bits_f32(e.magic_bits)) - e.magic_bits;
  // normal result: round the dropped mantissa bits half to even, then re-bias the exponent
  const uint32_t nor = ((a + e.round_half + ((a >> e.shift) & 1u)) >> e.shift) - e.rebias;
  uint32_t code = qk_select(qk_mask(a < e.min_normal), sub, nor);
  code = qk_select(qk_mask(a >= 0x7F800000u) | qk_mask(code > e.max_code), e.ovf_code, code);  // inf / overflow
  const uint32_t out = ((sign << e.nbits) | code) & (qk_mask(code != 0) | e.zero_mask);
  const uint32_t nan = qk_mask(a > 0x7F800000u) | qk_mask(code == 0xFFFFFFFFu);
  return (uint8_t)qk_select(nan, qk_select(qk_mask(sign != 0), e.nan_neg, e.nan_pos), out);
}

QK_HD uint8_t float_to_minifloat(float v, const MiniFloat& f, bool saturate) {
  return minifloat_encode(v, make_encoder(f, saturate));
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
  return bits_f32(a & qk_mask(a < 0x7F800000u));
}

// scale = amax / fp8_max, with 1 where that is 0 (all-zero block): nothing divides by zero and zeros stay zero.
QK_HD float fp8_scale_from_amax(float amax, float fmax) {
  const float s = amax / fmax;
  return s > 0.f ? s : 1.f;
}

}  // namespace qkernels
