// Integer dequant-GEMMs: the per-element weight decode shared by the CPU fallback, the CUDA tensor-core kernels
// (csrc/cuda/int_gemm.cu) and the CUDA dequantize-then-cuBLAS path, so that the CPU tests run the GPU's decode.
//
// Decode without int->float conversions (those are quarter rate on NVIDIA SMs): for an unsigned field u < 2^23,
// the float with bits 0x4B000000 | u is exactly 2^23 + u, so (2^23 + u) - (2^23 + zz) = u - zz exactly. Signed
// int4 codes are stored as two's-complement nibbles; XOR with 8 turns nibble(q) into the field q + 8, and the
// zero point is shifted by the same 8, so u - zz == q - zero_point for both signed and unsigned codes. The result
// scale * (u - zz) is therefore bit-identical to dequantize_int(q, scale, zero_point) of int_quant.h.
#pragma once
#include <cstdint>
#include <cstring>

#include "qkernels/macros.h"

namespace qkernels {

QK_HD float bits_as_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

constexpr uint32_t kTwo23Bits = 0x4B000000u;  // bit pattern of 2^23 as fp32
constexpr float kTwo23 = 8388608.f;

// XOR mask that turns 8 packed int4 codes (one 32-bit word) into unsigned fields (q + 8 for signed codes).
QK_HD uint32_t int4_word_to_fields(uint32_t word, bool is_signed) { return is_signed ? word ^ 0x88888888u : word; }

// Field of element `idx` (0..7) of a 32-bit word of packed int4: byte b holds element 2b (low nibble) and 2b+1.
QK_HD uint32_t int4_field(uint32_t fields, int idx) { return (fields >> (4 * idx)) & 0xFu; }

// The biased zero point that pairs with int4 fields: 2^23 + zero_point (+ 8 for signed codes).
QK_HD float int4_biased_zero(int32_t zero_point, bool is_signed) {
  return kTwo23 + (float)(zero_point + (is_signed ? 8 : 0));
}

// u - zz, exact for |u - zz| < 2^22 (u a non-negative field, zz_biased = 2^23 + zz).
QK_HD float field_minus_zero(uint32_t u, float zz_biased) { return bits_as_float(kTwo23Bits | u) - zz_biased; }

// w = scale * (q - zero_point) for one int4 field.
QK_HD float dequant_int4_field(uint32_t u, float scale, float zz_biased) {
  return scale * field_minus_zero(u, zz_biased);
}

// int8 weights: byte idx (0..3) of a word of int8 codes as the field q + 128; pair with kInt8BiasedZero.
QK_HD uint32_t int8_field(uint32_t word, int idx) { return ((word >> (8 * idx)) & 0xFFu) ^ 0x80u; }
constexpr float kInt8BiasedZero = kTwo23 + 128.f;

// q as an exact float from its int8 field (|q| <= 128 is exact in fp32, bf16 and fp16).
QK_HD float int8_field_value(uint32_t u) { return field_minus_zero(u, kInt8BiasedZero); }

}  // namespace qkernels
