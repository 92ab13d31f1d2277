// Plain-pointer AVX2 kernels behind the CPU fp8 casts and the small-M fp8 GEMM (float_avx2.cpp; no torch types, see
// int_gemm_avx2.cpp for why). Call them only where cpu_has_avx2_fma() (int_gemm_kernels.h) holds. Every kernel here
// is bit-identical to the portable loop it replaces (csrc/cpu/float8.cpp), except the GEMM, whose fp32 sums are
// ordered differently (as any GEMM's are).
#pragma once
#include <cstdint>

#include "qkernels/float8.h"

namespace qkernels {
namespace cpu {

// How the AVX2 kernels decode an 8-bit minifloat (e4m3fn, e5m2 and the fnuz pair): moving its sign and magnitude
// bits to the positions of fp16's (10 - M mantissa shift, sign to bit 15) gives an fp16 number h with
// value(code) = h * pow2 exactly, pow2 = 2^(15 - bias): the mantissa bits are the same, the exponent field is the
// same number, only the biases differ. That holds for subnormals too (fp16 subnormals start lower than any fp8's).
// F16C's vcvtph2ps then widens 8 of them to fp32 at once. Codes that fp16 would read differently are "special":
// NaN / inf codes and, for e5m2fnuz, the top binade (fp16's inf / NaN exponent); their lanes use lut_h.
struct Fp8HalfDecode {
  int mag_shift;       // 10 - M
  uint16_t spec_min;   // magnitudes (code & 0x7F) at or above this are special; 0x100: none
  uint16_t nan_code;   // one whole code that is special (0x80, the fnuz NaN); 0x100: none
  float pow2;          // 2^(15 - bias)
  float lut_h[256];    // value(code) / pow2 (exact) for every code
};

inline Fp8HalfDecode make_fp8_half_decode(const MiniFloat& f) {
  Fp8HalfDecode d;
  d.mag_shift = 10 - f.mbits;
  d.pow2 = bits_f32((uint32_t)(127 + 15 - f.bias) << 23);
  // e4m3fn: 0x7F is NaN; e5m2: the exponent-31 codes are inf / NaN (fp16 has them too, but its NaN payloads would
  // differ from the reference's canonical NaN); e5m2fnuz: exponent 31 is a normal binade there
  d.spec_min = f.fnuz ? (f.ebits == 5 ? 0x7C : 0x100) : (f.has_inf ? 0x7C : 0x7F);
  d.nan_code = f.fnuz ? 0x80 : 0x100;
  for (int c = 0; c < 256; ++c) d.lut_h[c] = minifloat_to_float((uint32_t)c, f) / d.pow2;
  return d;
}

// Element types of the casts' float side.
enum class FloatKind : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// dst[i] = value(q[i]) * scale, rounded once to dst's type, for i < n (what dequantize_fp8's LUT loop computes).
void fp8_decode_avx2(const uint8_t* q, int64_t n, float scale, const Fp8HalfDecode& d, void* dst, FloatKind out);

// dst[i] = minifloat_encode(float(src[i]) / scale, enc) for i < n (quantize_fp8's loop).
void fp8_encode_avx2(const void* src, FloatKind in, int64_t n, float scale, const MiniFloatEncoder& enc,
                     uint8_t* dst);

// out[m * ldo + n] = sum_k x[m, k] * value(w[n, k]) * bscale[(n / bb0) * ldbs + k / G] for n in [n0, n1), m < M:
// the fp8 weight side of fp8_mm with its scale grid (per-tensor: bb0 = N, G = K; per-row: bb0 = 1, G = K; blocks:
// bb0 x G). x fp32 [M, K] (the decoded activations); w [N, K] codes. Needs K % 16 == 0 and G % 16 == 0.
void fp8_mm_rows_avx2(const float* x, int64_t M, const uint8_t* w, const float* bscale, int64_t ldbs, int64_t bb0,
                      int64_t G, int64_t K, const Fp8HalfDecode& d, float* out, int64_t ldo, int64_t n0, int64_t n1);

// How the AVX2 kernels decode block-scaled fp4 (MXFP4 / NVFP4 with e2m1 or e1m2 elements): both element formats'
// values are multiples of 0.5 with |value| <= 6, so 2 * value is an exact int8 that one pshufb looks up for 16
// nibbles at once; the 0.5 goes into the block scale. Block scale codes go through a 256-entry table.
struct Fp4Decode {
  int8_t twice[16];      // 2 * value(nibble); -0 becomes 0 (sums do not see the difference)
  float block_scale[256];  // fp4_block_scale(code, nv, global scale): the fp32 factor of a block
  int64_t B;             // elements per block: 16 (NVFP4) or 32 (MXFP4)
};

// out[m * ldo + n] = sum_k x[m, k] * value(w[n, k]) * block_scale(wscale[n, k / B]) for n in [n0, n1), m < M: the
// weight side of fp4_mm. x fp32 [M, K] (the decoded activations); w [N, K/2] packed (element 2i in the low nibble);
// wscale [N, K/B] codes. Needs K % 32 == 0.
void fp4_mm_rows_avx2(const float* x, int64_t M, const uint8_t* w, const uint8_t* wscale, int64_t K,
                      const Fp4Decode& d, float* out, int64_t ldo, int64_t n0, int64_t n1);

// The same on int16 activations (bf16/fp16 x): xq int16 [M, K] in natural order with x = xq * xs[m, k / F]
// (i16_quantize_rows_avx2, int_gemm_kernels.h; F in {64, 128, 256} divides K). Needs K % 64 == 0.
void fp4_mm_rows_avx2_i16(const int16_t* xq, int64_t M, const float* xs, int64_t F, const uint8_t* w,
                          const uint8_t* wscale, int64_t K, const Fp4Decode& d, float* out, int64_t ldo, int64_t n0,
                          int64_t n1);

// One row of dequantize_fp4: dst[k] = value(nibble k) * block_scale(s[k / B]), rounded once to dst's type, bit for
// bit what Fp4Rows (float4.cpp) and the cast give. p: K/2 bytes, s: K/B codes; K % 32 == 0.
void fp4_decode_row_avx2(const uint8_t* p, const uint8_t* s, int64_t K, const Fp4Decode& d, void* dst, FloatKind out);

}  // namespace cpu
}  // namespace qkernels
