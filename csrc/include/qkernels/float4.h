// 4-bit floating-point elements and their block scales, identical on CPU and GPU.
//
// Element formats (sign bit 3, then exponent, then mantissa; encode = float8.h's float_to_minifloat, always
// saturating, RNE):
//  * e2m1 (OCP MX v1.0 "FP4"): bias 1, values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, emax 2.
//  * e1m2 (emulated, not an OCP format): 1 exponent bit with the IEEE bias 2^(1-1) - 1 = 0, 2 mantissa bits:
//    subnormals (exp 0) 2^1 * 0.mm = {0, 0.5, 1, 1.5}, normals (exp 1) 2^1 * 1.mm = {2, 2.5, 3, 3.5};
//    i.e. a uniform grid of step 0.5 up to 3.5, emax 1. No inf/NaN.
// Packing: two codes per byte, element 2i in the low nibble.
// Block scales:
//  * MX (OCP Microscaling Formats (MX) Specification v1.0, 2023, sec. 5 and 6.3): 32 elements share an E8M0 scale
//    X = 2^(floor(log2(amax)) - emax_elem), code = exponent + 127 clamped to [0, 254]; 255 is NaN. An all-zero
//    block gets code 0 (as gguf's MXFP4 quantizer does). Elements P_i = encode(V_i / X).
//  * NV (NVFP4, NVIDIA Blackwell): 16 elements share an e4m3fn scale s_b = e4m3(amax_block / elem_max / g),
//    g an fp32 per-tensor scale (default amax_tensor / (448 * elem_max)); P_i = encode(V_i / (float(s_b) * g)).
//  * A block holding NaN or +-inf gets a NaN scale and zero codes, so it dequantizes to NaN (never to a finite
//    value that hides the bad input).
#pragma once
#include <cstdint>

#include "qkernels/float8.h"
#include "qkernels/macros.h"

namespace qkernels {

constexpr int kMXBlock = 32;
constexpr int kNVBlock = 16;

QK_HD uint8_t fp4_encode(float v, const MiniFloat& elem) { return float_to_minifloat(v, elem, true); }

QK_HD float fp4_decode(uint32_t nibble, const MiniFloat& elem) { return minifloat_to_float(nibble & 0xF, elem); }

// emax of an element format: the exponent of its largest normal value (2 for e2m1, 1 for e1m2).
QK_HD int minifloat_emax(const MiniFloat& f) { return (int)(f.max_code >> f.mbits) - f.bias; }

// floor(log2(a)) for a finite a > 0, subnormals included (bit scan instead of log2f, so it is exact everywhere).
QK_HD int floor_log2(float a) {
  const uint32_t u = f32_bits(a) & 0x7FFFFFFFu;
  const int e = (int)(u >> 23);
  if (e > 0) return e - 127;
  int msb = 22;
  while (msb > 0 && !((u >> msb) & 1u)) --msb;
  return msb - 149;
}

QK_HD float e8m0_to_float(uint32_t code) {
  code &= 0xFF;
  if (code == 255) return bits_f32(0x7FC00000u);
  if (code == 0) return bits_f32(0x00400000u);  // 2^-127 is an fp32 subnormal
  return bits_f32(code << 23);
}

// MX shared scale of a block with finite maximum magnitude amax (NaN/inf blocks are handled by the caller).
QK_HD uint8_t mx_scale_code(float amax, const MiniFloat& elem) {
  if (!(amax > 0.f)) return 0;
  int code = floor_log2(amax) - minifloat_emax(elem) + 127;
  code = code < 0 ? 0 : (code > 254 ? 254 : code);
  return (uint8_t)code;
}

// NVFP4 block scale (e4m3fn bits) from the block's finite amax and the per-tensor scale g.
QK_HD uint8_t nv_scale_code(float amax, float g, const MiniFloat& elem) {
  const float s = amax / minifloat_max(elem) / g;
  return float_to_minifloat(s, minifloat_format(kE4M3FN), true);
}

// Default NVFP4 per-tensor scale: the tensor's finite amax / (448 * elem_max), 1 when that is 0.
QK_HD float nv_global_scale(float amax, const MiniFloat& elem) {
  const float g = amax / (448.f * minifloat_max(elem));
  return g > 0.f ? g : 1.f;
}

// The fp32 factor a block's codes are multiplied by: 2^e (MX) or float(s_b) * g (NV).
QK_HD float fp4_block_scale(uint8_t code, bool nv, float g) {
  return nv ? minifloat_to_float(code, minifloat_format(kE4M3FN)) * g : e8m0_to_float(code);
}

}  // namespace qkernels
