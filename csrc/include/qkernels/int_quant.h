// Integer affine quantization: the per-element arithmetic, identical on CPU and GPU.
//
// Numerics (the specification is qkernels/reference/int_quant.py; keep both in step):
//  * all arithmetic in fp32; q = clamp(round_half_even(w / scale) + zero_point, qmin, qmax)
//  * float zero-point domain (GGUF "scale + min"): q = clamp(round_half_even((w - min) / scale), 0, 2^bits - 1)
//  * a zero scale (constant or all-zero group) is replaced by 1 so nothing divides by zero; such a group still
//    round-trips exactly because its range [min(w,0), max(w,0)] covers 0 and the zero point lands on it.
#pragma once
#include <cmath>
#include <cstdint>

#include "qkernels/macros.h"

namespace qkernels {

struct QRange {
  int32_t qmin, qmax;
};

QK_HD QRange int_range(int bits, bool is_signed) {
  return is_signed ? QRange{-(1 << (bits - 1)), (1 << (bits - 1)) - 1} : QRange{0, (1 << bits) - 1};
}

QK_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return rintf(v);
#else
  return std::nearbyint(v);  // default rounding mode is to-nearest-even
#endif
}

QK_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Scale and integer zero point of one group from its min and max.
// Symmetric: scale = max(|vmin|, |vmax|) / qmax_pos, zero_point = 0 (signed) or 2^(bits-1) (unsigned).
// Asymmetric: range widened to include 0, scale = (vmax - vmin) / (qmax - qmin), zp = qmin - round(vmin / scale).
QK_HD void affine_qparams(float vmin, float vmax, int bits, bool symmetric, bool is_signed, float* scale,
                          int32_t* zero_point) {
  QRange r = int_range(bits, is_signed);
  vmin = vmin < 0.f ? vmin : 0.f;
  vmax = vmax > 0.f ? vmax : 0.f;
  if (symmetric) {
    float amax = -vmin > vmax ? -vmin : vmax;
    float s = amax / (float)((1 << (bits - 1)) - 1);
    *scale = s > 0.f ? s : 1.f;
    *zero_point = is_signed ? 0 : (1 << (bits - 1));
  } else {
    float s = (vmax - vmin) / (float)(r.qmax - r.qmin);
    s = s > 0.f ? s : 1.f;
    float zp = (float)r.qmin - round_half_even(vmin / s);
    *scale = s;
    *zero_point = (int32_t)clampf(zp, (float)r.qmin, (float)r.qmax);
  }
}

// Float zero-point domain: w ~= scale * q + min, q unsigned in [0, 2^bits - 1]; min is the group's own minimum
// (Q4_1-style; it need not include 0 because 0 is not a code here).
QK_HD void float_zp_qparams(float vmin, float vmax, int bits, float* scale, float* min_out) {
  float s = (vmax - vmin) / (float)((1 << bits) - 1);
  *scale = s > 0.f ? s : 1.f;
  *min_out = vmin;
}

QK_HD int32_t quantize_int(float w, float scale, int32_t zero_point, QRange r) {
  float q = round_half_even(w / scale) + (float)zero_point;
  return (int32_t)clampf(q, (float)r.qmin, (float)r.qmax);
}

QK_HD int32_t quantize_float_zp(float w, float scale, float min_v, int bits) {
  float q = round_half_even((w - min_v) / scale);
  return (int32_t)clampf(q, 0.f, (float)((1 << bits) - 1));
}

QK_HD float dequantize_int(int32_t q, float scale, int32_t zero_point) { return scale * (float)(q - zero_point); }

// A product that is never contracted with a following add into an FMA (nvcc contracts by default, the x86-64
// baseline and the reference's separate torch ops do not), so that scale * q + min rounds twice everywhere.
QK_HD float mul_no_fma(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QK_HD float dequantize_float_zp(int32_t q, float scale, float min_v) { return mul_no_fma(scale, (float)q) + min_v; }

// int4 nibbles: element 2i in the low nibble of byte i, element 2i+1 in the high nibble. Signed values are
// stored as two's-complement nibbles (so -1 -> 0xF), unsigned as-is.
QK_HD uint8_t pack_nibbles(int32_t lo, int32_t hi) { return (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4)); }

QK_HD int32_t nibble_value(uint8_t nib, bool is_signed) {
  int32_t v = nib & 0xF;
  return is_signed ? ((v ^ 8) - 8) : v;  // sign-extend bit 3
}

}  // namespace qkernels
