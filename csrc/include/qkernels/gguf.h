// GGUF / llama.cpp block formats: per-block decode math, identical on CPU and GPU.
//
// Layouts are ggml's block_* structs (ggml/src/ggml-common.h), byte for byte; the specification with a table of all
// layouts is qkernels/reference/gguf.py. Every decoder uses the float32 operation order of ggml's dequantize_row_*
// (and gguf-py's dequantize), so the floats are bit-identical: e.g. Q4_K is (d * sc) * q - (dmin * m), Q6_K is
// (d * sc) * q. Keep this file and the reference in step.
#pragma once
#include <cstdint>
#include <cstring>

#include "qkernels/macros.h"

namespace qkernels {
namespace gguf {

// The ggml types implemented here, one line each: X(name, ggml type id, values per block, bytes per block). The
// specification is the type table of qkernels/reference/gguf.py (GGML_TYPES); C++ cannot read it, so
// tests/test_format_tables.py checks that the ops accept exactly its types with its sizes (and list them in their
// error text, which is generated from this list). A new type adds a line here, its decoder below and its encoder in
// csrc/cpu/gguf_encode.h.
#define QK_GGUF_TYPES(X)                                                                                        \
  X(F32, 0, 1, 4) X(F16, 1, 1, 2) X(Q4_0, 2, 32, 18) X(Q4_1, 3, 32, 20) X(Q5_0, 6, 32, 22) X(Q5_1, 7, 32, 24)   \
  X(Q8_0, 8, 32, 34) X(Q2_K, 10, 256, 84) X(Q3_K, 11, 256, 110) X(Q4_K, 12, 256, 144) X(Q5_K, 13, 256, 176)    \
  X(Q6_K, 14, 256, 210) X(BF16, 30, 1, 2) X(MXFP4, 39, 32, 17)

// ggml type ids (enum ggml_type)
enum Type : int {
#define QK_GGUF_ENUM(name, id, bs, ts) name = id,
  QK_GGUF_TYPES(QK_GGUF_ENUM)
#undef QK_GGUF_ENUM
};

// Values per block and bytes per block; 0 for types we do not know.
QK_HD int block_size(int t) {
  switch (t) {
#define QK_GGUF_BS(name, id, bs, ts) case name: return bs;
    QK_GGUF_TYPES(QK_GGUF_BS)
#undef QK_GGUF_BS
    default: return 0;
  }
}

QK_HD int type_size(int t) {
  switch (t) {
#define QK_GGUF_TS(name, id, bs, ts) case name: return ts;
    QK_GGUF_TYPES(QK_GGUF_TS)
#undef QK_GGUF_TS
    default: return 0;
  }
}

QK_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

QK_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> float32, exact (subnormals, inf and NaN included).
QK_HD float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    int e = -1;  // normalise the subnormal
    do {
      mant <<= 1;
      ++e;
    } while (!(mant & 0x400));
    return bits_to_float(sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3FF) << 13));
  }
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// float32 -> binary16, round to nearest even (what GGML_FP32_TO_FP16, numpy and torch do).
QK_HD uint16_t fp32_to_fp16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7FFFFFFF;
  if (ax > 0x7F800000) return (uint16_t)(sign | 0x7E00);     // NaN
  if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);    // >= 65520 rounds to inf
  if (ax < 0x38800000) {                                     // below the smallest normal half (2^-14)
    if (ax < 0x33000000) return (uint16_t)sign;              // < 2^-25 rounds to 0 (2^-25 itself is a tie to even 0)
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFF) | 0x800000;
    const uint32_t shift = 126 - e;                          // 14 - (e - 127) + 13 - 1 ... result = m >> (shift)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ax - 0x38000000;                              // rebias exponent 127 -> 15 (still 13 extra bits)
  const uint32_t rem = r & 0x1FFF;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return (uint16_t)(sign | r);
}

QK_HD float bf16_to_fp32(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

QK_HD float read_fp16(const uint8_t* p) { return fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8))); }

// MXFP4 scale: 2^(e - 128), i.e. half the e8m0 value (the e2m1 table below is doubled); subnormal for e < 2.
QK_HD float e8m0_to_fp32_half(uint8_t e) {
  return bits_to_float(e < 2 ? (0x00200000u << e) : ((uint32_t)(e - 1) << 23));
}

// 2 * e2m1 value of a nibble
QK_HD float mxfp4_value(int nib) {
  const int8_t k[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  return (float)k[nib & 15];
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
QK_HD void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q3_K: signed 6-bit scale of sub-block j (0..15).
QK_HD int q3_k_scale(int j, const uint8_t* s) {
  const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}

// ---- per-block decoders: b points at one block, y receives block_size(type) floats -----------------------------

QK_HD void decode_q4_0(const uint8_t* b, float* y) {
  const float d = read_fp16(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (float)((b[2 + j] & 0xF) - 8);
    y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
  }
}

QK_HD void decode_q4_1(const uint8_t* b, float* y) {
  const float d = read_fp16(b), m = read_fp16(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (float)(b[4 + j] & 0xF) + m;
    y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
  }
}

QK_HD uint32_t read_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

QK_HD void decode_q5_0(const uint8_t* b, float* y) {
  const float d = read_fp16(b);
  const uint32_t qh = read_u32(b + 2);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[6 + j] & 0xF) | (((qh >> j) & 1) << 4);
    const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * (float)(lo - 16);
    y[j + 16] = d * (float)(hi - 16);
  }
}

QK_HD void decode_q5_1(const uint8_t* b, float* y) {
  const float d = read_fp16(b), m = read_fp16(b + 2);
  const uint32_t qh = read_u32(b + 4);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[8 + j] & 0xF) | (((qh >> j) & 1) << 4);
    const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * (float)lo + m;
    y[j + 16] = d * (float)hi + m;
  }
}

QK_HD void decode_q8_0(const uint8_t* b, float* y) {
  const float d = read_fp16(b);
  for (int j = 0; j < 32; ++j) y[j] = (float)(int8_t)b[2 + j] * d;
}

QK_HD void decode_mxfp4(const uint8_t* b, float* y) {
  const float d = e8m0_to_fp32_half(b[0]);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * mxfp4_value(b[1 + j] & 0xF);
    y[j + 16] = d * mxfp4_value(b[1 + j] >> 4);
  }
}

QK_HD void decode_q2_k(const uint8_t* b, float* y) {
  const uint8_t* sc = b;
  const float d = read_fp16(b + 80), dmin = read_fp16(b + 82);
  // element 128 h + 32 k + l sits in bits 2k..2k+1 of qs[32 h + l]; sub-block (16 values) j = e / 16
  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = b + 16 + 32 * h;
    for (int k = 0; k < 4; ++k) {
      for (int half = 0; half < 2; ++half) {
        const int j = 8 * h + 2 * k + half;
        const float dl = d * (float)(sc[j] & 0xF), ml = dmin * (float)(sc[j] >> 4);
        float* yo = y + 16 * j;
        const uint8_t* qq = q + 16 * half;
        for (int l = 0; l < 16; ++l) yo[l] = dl * (float)((qq[l] >> (2 * k)) & 3) - ml;
      }
    }
  }
}

QK_HD void decode_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const float d = read_fp16(b + 108);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = b + 32 + 32 * h;
    for (int k = 0; k < 4; ++k) {
      const int bit = 4 * h + k;  // hmask bit of the 32 values 128 h + 32 k + [0, 32)
      for (int half = 0; half < 2; ++half) {
        const int j = 8 * h + 2 * k + half;
        const float dl = d * (float)q3_k_scale(j, b + 96);
        float* yo = y + 16 * j;
        for (int l = 0; l < 16; ++l) {
          const int i = 16 * half + l;
          const int v = ((q[i] >> (2 * k)) & 3) - (((hm[i] >> bit) & 1) ? 0 : 4);
          yo[l] = dl * (float)v;
        }
      }
    }
  }
}

QK_HD void decode_q4_k(const uint8_t* b, float* y) {
  const float d = read_fp16(b), dmin = read_fp16(b + 2);
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min_k4(j, b + 4, &sc, &m);
    const float d1 = d * (float)sc, m1 = dmin * (float)m;
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = (j & 1) * 4;
    for (int l = 0; l < 32; ++l) y[32 * j + l] = d1 * (float)((q[l] >> shift) & 0xF) - m1;
  }
}

QK_HD void decode_q5_k(const uint8_t* b, float* y) {
  const float d = read_fp16(b), dmin = read_fp16(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min_k4(j, b + 4, &sc, &m);
    const float d1 = d * (float)sc, m1 = dmin * (float)m;
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = (j & 1) * 4;
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 0xF) | (((qh[l] >> j) & 1) << 4);
      y[32 * j + l] = d1 * (float)v - m1;
    }
  }
}

QK_HD void decode_q6_k(const uint8_t* b, float* y) {
  const int8_t* sc = (const int8_t*)(b + 192);
  const float d = read_fp16(b + 208);
  // element 128 h + 32 k + l: low 4 bits in ql[64 h + 32 (k & 1) + l] (low nibble for k < 2), high 2 bits in
  // qh[32 h + l] >> 2k; scale sc[e / 16]
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int k = 0; k < 4; ++k) {
      const uint8_t* lo = ql + 32 * (k & 1);
      const int shift = k < 2 ? 0 : 4;
      for (int half = 0; half < 2; ++half) {
        const int j = 8 * h + 2 * k + half;
        const float dl = d * (float)sc[j];
        float* yo = y + 16 * j;
        for (int l = 0; l < 16; ++l) {
          const int i = 16 * half + l;
          const int v = (((lo[i] >> shift) & 0xF) | (((qh[i] >> (2 * k)) & 3) << 4)) - 32;
          yo[l] = dl * (float)v;
        }
      }
    }
  }
}

// Decodes one block of type t; returns false for an unknown type.
QK_HD bool decode_block(int t, const uint8_t* b, float* y) {
  switch (t) {
    case F32: memcpy(y, b, 4); return true;
    case F16: y[0] = read_fp16(b); return true;
    case BF16: y[0] = bf16_to_fp32((uint16_t)(b[0] | (b[1] << 8))); return true;
    case Q4_0: decode_q4_0(b, y); return true;
    case Q4_1: decode_q4_1(b, y); return true;
    case Q5_0: decode_q5_0(b, y); return true;
    case Q5_1: decode_q5_1(b, y); return true;
    case Q8_0: decode_q8_0(b, y); return true;
    case MXFP4: decode_mxfp4(b, y); return true;
    case Q2_K: decode_q2_k(b, y); return true;
    case Q3_K: decode_q3_k(b, y); return true;
    case Q4_K: decode_q4_k(b, y); return true;
    case Q5_K: decode_q5_k(b, y); return true;
    case Q6_K: decode_q6_k(b, y); return true;
    default: return false;
  }
}

}  // namespace gguf
}  // namespace qkernels
