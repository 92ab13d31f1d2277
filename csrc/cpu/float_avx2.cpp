// AVX2 kernels for the CPU fp8 casts, fp4 dequantization and the small-M fp8 / fp4 GEMMs (declared, with their contracts, in float_kernels.h).
// Like int_gemm_avx2.cpp this file includes no torch header and only its functions carry the AVX2 target attribute;
// float8.cpp calls them after the run-time CPU check.
#include "float_kernels.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx2_tiles.h"

namespace qkernels {
namespace cpu {
namespace {

// ---- decode: 16 codes -> 16 fp16 bit patterns h (value = h * pow2), see Fp8HalfDecode ----------------------------

struct HalfConsts {
  __m256i mag_mask, sign_mask, spec_min1, nan_code;
  __m128i mag_shift;
  QK_AVX2 explicit HalfConsts(const Fp8HalfDecode& d)
      : mag_mask(_mm256_set1_epi16(0x7F)),
        sign_mask(_mm256_set1_epi16((short)0x8000)),
        spec_min1(_mm256_set1_epi16((short)(d.spec_min - 1))),
        nan_code(_mm256_set1_epi16((short)d.nan_code)),
        mag_shift(_mm_cvtsi32_si128(d.mag_shift)) {}
};

// h for 16 codes; ORs the lanes holding special codes into `spec` (then decode16_slow must take these 16). NAN80:
// the format has a whole-code NaN (fnuz 0x80) to look for besides the magnitude test.
template <bool NAN80>
QK_AVX2 inline __m256i half_bits16(const uint8_t* q, const HalfConsts& c, __m256i& spec) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
  const __m256i mag = _mm256_and_si256(v, c.mag_mask);
  spec = _mm256_or_si256(spec, _mm256_cmpgt_epi16(mag, c.spec_min1));
  if (NAN80) spec = _mm256_or_si256(spec, _mm256_cmpeq_epi16(v, c.nan_code));
  // the sign (bit 7) goes to bit 15: v << 8 puts it there, and the magnitude bits it drags along are masked off
  return _mm256_or_si256(_mm256_sll_epi16(mag, c.mag_shift), _mm256_and_si256(_mm256_slli_epi16(v, 8), c.sign_mask));
}

QK_AVX2 inline bool any_lane(__m256i m) { return !_mm256_testz_si256(m, m); }

QK_AVX2 inline void half_to_ps(__m256i h, __m256& lo, __m256& hi) {
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// the 16 values / pow2 from the table (special lanes: exact NaN / inf / top-binade values)
QK_AVX2 inline void decode16_slow(const uint8_t* q, const Fp8HalfDecode& d, __m256& lo, __m256& hi) {
  alignas(32) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = d.lut_h[q[i]];
  lo = _mm256_load_ps(t);
  hi = _mm256_load_ps(t + 8);
}

// ---- fp32 -> bf16 / fp16 with the rounding of c10's conversions ------------------------------------------------

// c10::BFloat16(float): round to nearest even on the bits, NaN -> 0x7FC0. Returns the 8 results in the low 16 bits
// of 32-bit lanes.
QK_AVX2 inline __m256i ps_to_bf16_lanes(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// 16 fp32 -> 16 bf16 / fp16 stored at dst
QK_AVX2 inline void store16(__m256 lo, __m256 hi, FloatKind out, void* dst) {
  if (out == FloatKind::kF32) {
    _mm256_storeu_ps((float*)dst, lo);
    _mm256_storeu_ps((float*)dst + 8, hi);
  } else if (out == FloatKind::kBF16) {
    // packus keeps 0..0xFFFF as is; it interleaves the 128-bit lanes, the permute restores the order
    const __m256i p = _mm256_packus_epi32(ps_to_bf16_lanes(lo), ps_to_bf16_lanes(hi));
    _mm256_storeu_si256((__m256i*)dst, _mm256_permute4x64_epi64(p, 0xD8));
  } else {
    _mm_storeu_si128((__m128i*)dst, _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128((__m128i*)dst + 1, _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// ---- encode: 8 fp32 -> 8 codes (int32 lanes), minifloat_encode of float8.h lane by lane --------------------------

struct EncodeConsts {
  __m256i min_normal, magic_bits, round_half, rebias, max_code, ovf_code, nan_pos, nan_neg, zero_mask;
  __m128i shift, nbits;
  QK_AVX2 explicit EncodeConsts(const MiniFloatEncoder& e)
      : min_normal(_mm256_set1_epi32((int)e.min_normal)),
        magic_bits(_mm256_set1_epi32((int)e.magic_bits)),
        round_half(_mm256_set1_epi32((int)e.round_half)),
        rebias(_mm256_set1_epi32((int)e.rebias)),
        max_code(_mm256_set1_epi32((int)e.max_code)),
        ovf_code(_mm256_set1_epi32((int)e.ovf_code)),
        nan_pos(_mm256_set1_epi32((int)e.nan_pos)),
        nan_neg(_mm256_set1_epi32((int)e.nan_neg)),
        zero_mask(_mm256_set1_epi32((int)e.zero_mask)),
        shift(_mm_cvtsi32_si128((int)e.shift)),
        nbits(_mm_cvtsi32_si128((int)e.nbits)) {}
};

// All compares below are signed: a <= 0x7FFFFFFF and every code before the overflow select is < 2^24.
QK_AVX2 inline __m256i encode8(__m256 v, const EncodeConsts& c) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i u = _mm256_castps_si256(v);
  const __m256i sign = _mm256_srli_epi32(u, 31);
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i sub = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c.magic_bits))), c.magic_bits);
  const __m256i lsb = _mm256_and_si256(_mm256_srl_epi32(a, c.shift), one);
  const __m256i nor = _mm256_sub_epi32(
      _mm256_srl_epi32(_mm256_add_epi32(_mm256_add_epi32(a, c.round_half), lsb), c.shift), c.rebias);
  __m256i code = _mm256_blendv_epi8(nor, sub, _mm256_cmpgt_epi32(c.min_normal, a));
  const __m256i ovf = _mm256_or_si256(_mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F7FFFFF)),
                                      _mm256_cmpgt_epi32(code, c.max_code));
  code = _mm256_blendv_epi8(code, c.ovf_code, ovf);
  const __m256i nonzero = _mm256_xor_si256(_mm256_cmpeq_epi32(code, _mm256_setzero_si256()), _mm256_set1_epi32(-1));
  const __m256i out = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(sign, c.nbits), code),
                                       _mm256_or_si256(nonzero, c.zero_mask));
  const __m256i nan = _mm256_or_si256(_mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000)),
                                      _mm256_cmpeq_epi32(code, _mm256_set1_epi32(-1)));
  const __m256i nanv = _mm256_blendv_epi8(c.nan_pos, c.nan_neg, _mm256_cmpeq_epi32(sign, one));
  return _mm256_blendv_epi8(out, nanv, nan);
}

QK_AVX2 inline __m256 load8(const void* src, FloatKind in, int64_t i) {
  if (in == FloatKind::kF32) return _mm256_loadu_ps((const float*)src + i);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)src + i));
  if (in == FloatKind::kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16: the top half of fp32
}

QK_AVX2 inline float load1(const void* src, FloatKind in, int64_t i) {
  if (in == FloatKind::kF32) return ((const float*)src)[i];
  const uint16_t h = ((const uint16_t*)src)[i];
  if (in == FloatKind::kF16) return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
  return bits_f32((uint32_t)h << 16);
}

// ---- the fp8-weight GEMM tile: NR weight rows x MT rows of x ---------------------------------------------------

// Per 16 k and weight row: one 16-byte load, 5 integer ops to fp16 bit patterns, 2 vcvtph2ps, and 2 FMAs per x row
// (against 2 pmovsx + 2 cvtdq2ps for int8 weights). The products are h * x = value * x / pow2 exactly, so the
// block sums are scaled by bscale * pow2 at the end. GROUPED (block-wise scales along K): the sums of each
// G-block are folded into `total` with their block's scale; otherwise one scale per row multiplies the final sum.
// The special-code test is folded over the NR rows of a step: one branch per step, not per row.
template <int NR, int MT, bool GROUPED, bool NAN80>
QK_AVX2 void f8_tile(const float* x, const uint8_t* w, const float* const (&srow)[NR], int64_t G, int64_t K,
                     const Fp8HalfDecode& d, const HalfConsts& hc, float* out, int64_t ldo, const char* pf) {
  __m256 total[NR][MT];
  __m256 a[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = a[r][m] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    for (int64_t k = g0; k < g0 + G; k += 16) {
      if (pf) _mm_prefetch(pf + (k / 16) * kPrefetchStep, _MM_HINT_T0);  // 4 rows x 16 bytes per step
      __m256i h[NR];
      __m256i spec = _mm256_setzero_si256();
      for (int r = 0; r < NR; ++r) h[r] = half_bits16<NAN80>(w + r * K + k, hc, spec);
      const bool special = __builtin_expect(any_lane(spec), 0);
      for (int r = 0; r < NR; ++r) {
        __m256 w0, w1;
        if (special) {
          decode16_slow(w + r * K + k, d, w0, w1);
        } else {
          half_to_ps(h[r], w0, w1);
        }
        for (int m = 0; m < MT; ++m) {
          const float* xk = x + m * K + k;
          a[r][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), a[r][m]);
          a[r][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), a[r][m]);
        }
      }
    }
    if (GROUPED) {
      for (int r = 0; r < NR; ++r) {
        const __m256 s = _mm256_set1_ps(srow[r][g0 / G]);
        for (int m = 0; m < MT; ++m) {
          total[r][m] = _mm256_fmadd_ps(a[r][m], s, total[r][m]);
          a[r][m] = _mm256_setzero_ps();
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) {
      out[m * ldo + r] = GROUPED ? hsum(total[r][m]) * d.pow2 : hsum(a[r][m]) * d.pow2 * srow[r][0];
    }
}

// ---- fp4: 16 packed bytes -> 32 elements as 2 * value, in 4 vectors of 8 fp32 (elements 0-7, 8-15, 16-23, 24-31) --

// 16 packed bytes -> their 32 nibbles (bl: low = elements 0, 2, ...; bh: high = 1, 3, ...) and the looked-up int8
// 2 * value of elements 0-15 (e0) and 16-31 (e1), in order.
QK_AVX2 inline void fp4_twice_i8(const uint8_t* p, __m128i table, __m128i& bl, __m128i& bh, __m128i& e0,
                                 __m128i& e1) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m128i nib = _mm_set1_epi8(0x0F);
  bl = _mm_and_si128(b, nib);
  bh = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  const __m128i lo = _mm_shuffle_epi8(table, bl), hi = _mm_shuffle_epi8(table, bh);
  e0 = _mm_unpacklo_epi8(lo, hi);
  e1 = _mm_unpackhi_epi8(lo, hi);
}

// SIGNED_ZERO: also give the -0 code (nibble 8) its sign, which the int8 table cannot hold (the casts are bit-exact;
// the GEMM sums do not need it).
template <bool SIGNED_ZERO = false>
QK_AVX2 inline void fp4_twice32(const uint8_t* p, __m128i table, __m256 (&v)[4]) {
  __m128i bl, bh, e0, e1;
  fp4_twice_i8(p, table, bl, bh, e0, e1);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e0));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e0, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e1));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e1, 8)));
  if (SIGNED_ZERO) {
    // the sign bit (8) of every nibble, moved to bit 31 of its lane; OR-ing it onto a negative value changes nothing
    const __m128i s8 = _mm_set1_epi8(8);
    const __m128i s0 = _mm_unpacklo_epi8(_mm_and_si128(bl, s8), _mm_and_si128(bh, s8));
    const __m128i s1 = _mm_unpackhi_epi8(_mm_and_si128(bl, s8), _mm_and_si128(bh, s8));
    const __m128i parts[4] = {s0, _mm_srli_si128(s0, 8), s1, _mm_srli_si128(s1, 8)};
    for (int j = 0; j < 4; ++j) {
      const __m256i sign = _mm256_slli_epi32(_mm256_cvtepu8_epi32(parts[j]), 28);
      v[j] = _mm256_or_ps(v[j], _mm256_castsi256_ps(sign));
    }
  }
}

// NR weight rows x MT rows of x, 32 k per step: per weight row one 16-byte load, ~10 ops of decode for 32 elements,
// 4 FMAs per x row into the block sum, and one FMA per block that folds the sum into `total` with the block scale.
template <int NR, int MT, bool NV>
QK_AVX2 void f4_tile(const float* x, const uint8_t* w, const uint8_t* ws, int64_t K, const Fp4Decode& d,
                     float* out, int64_t ldo, const char* pf) {
  const __m128i table = _mm_loadu_si128((const __m128i*)d.twice);
  const int64_t nb = K / d.B;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    if (pf) _mm_prefetch(pf + (k / 32) * kPrefetchStep, _MM_HINT_T0);  // 4 rows x 16 bytes per step
    for (int r = 0; r < NR; ++r) {
      __m256 v[4];
      fp4_twice32(w + r * (K / 2) + k / 2, table, v);
      const uint8_t* sc = ws + r * nb + k / d.B;
      for (int m = 0; m < MT; ++m) {
        const float* xk = x + m * K + k;
        __m256 s0 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xk));
        s0 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xk + 8), s0);
        if (NV) {  // two 16-element blocks per step
          __m256 s1 = _mm256_mul_ps(v[2], _mm256_loadu_ps(xk + 16));
          s1 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xk + 24), s1);
          total[r][m] = _mm256_fmadd_ps(s0, _mm256_set1_ps(d.block_scale[sc[0]]), total[r][m]);
          total[r][m] = _mm256_fmadd_ps(s1, _mm256_set1_ps(d.block_scale[sc[1]]), total[r][m]);
        } else {
          s0 = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xk + 16), s0);
          s0 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xk + 24), s0);
          total[r][m] = _mm256_fmadd_ps(s0, _mm256_set1_ps(d.block_scale[sc[0]]), total[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[m * ldo + r] = hsum(total[r][m]) * 0.5f;  // the elements were 2 * value
}

// The same GEMM on int16 activations (bf16/fp16 x, x = xq * xs[m, k / F], i16_quantize_rows_avx2): the 32 looked-up
// int8 values 2 * v widen to int16 and vpmaddwd multiplies them with xq, 16 products per instruction summed in
// pairs into int32 (|2 v| <= 12, |xq| < 2^15: a lane stays below 2^20). Each fp4 block's int32 sums are converted
// once and folded in with block_scale * xs. Per 32 weights and x row: 2 vpmaddwd against 4 FMAs, and 2 widenings
// instead of 4 int8 -> fp32 conversions per weight row.
template <int NR, int MT, bool NV>
QK_AVX2 void f4i_tile(const int16_t* xq, const float* xs, int64_t F, const uint8_t* w, const uint8_t* ws, int64_t K,
                      const Fp4Decode& d, float* out, int64_t ldo, const char* pf) {
  const __m128i table = _mm_loadu_si128((const __m128i*)d.twice);
  const int64_t nb = K / d.B, nF = K / F;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    if (pf) _mm_prefetch(pf + (k / 32) * kPrefetchStep, _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) {
      __m128i bl, bh, e0, e1;
      fp4_twice_i8(w + r * (K / 2) + k / 2, table, bl, bh, e0, e1);
      const __m256i w0 = _mm256_cvtepi8_epi16(e0), w1 = _mm256_cvtepi8_epi16(e1);  // elements 0-15, 16-31
      const uint8_t* sc = ws + r * nb + k / d.B;
      // block scales broadcast once per weight row and step; x's block scale multiplies them per x row
      const __m256 s0 = _mm256_set1_ps(d.block_scale[sc[0]]);
      const __m256 s1 = NV ? _mm256_set1_ps(d.block_scale[sc[1]]) : s0;
      for (int m = 0; m < MT; ++m) {
        const __m256i* xv = (const __m256i*)(xq + m * K + k);
        const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(xv));
        const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1));
        const __m256 sx = _mm256_broadcast_ss(xs + m * nF + k / F);
        if (NV) {  // two 16-element blocks per step: combine them in fp32 before the one fold
          const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s1, _mm256_mul_ps(_mm256_cvtepi32_ps(p0), s0));
          total[r][m] = _mm256_fmadd_ps(v, sx, total[r][m]);
        } else {
          total[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), _mm256_mul_ps(s0, sx),
                                        total[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[m * ldo + r] = hsum(total[r][m]) * 0.5f;  // the elements were 2 * value
}

}  // namespace

QK_AVX2 void fp8_decode_avx2(const uint8_t* q, int64_t n, float scale, const Fp8HalfDecode& d, void* dst,
                             FloatKind out) {
  const size_t esize = out == FloatKind::kF32 ? 4 : 2;
  char* o = (char*)dst;
  // value * scale == h * (pow2 * scale) when pow2 * scale is exact (pow2 is a power of two): both are the same real
  // number rounded once. Otherwise (scale near fp32's range ends, NaN, inf) the table path computes it.
  const float s2 = d.pow2 * scale;
  const bool exact = std::isfinite(s2) && (std::fpclassify(s2) != FP_SUBNORMAL || d.pow2 >= 1.f);
  int64_t i = 0;
  if (exact) {
    const HalfConsts hc(d);
    const __m256 vs2 = _mm256_set1_ps(s2), vs = _mm256_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
      __m256i spec = _mm256_setzero_si256();
      const __m256i h = half_bits16<true>(q + i, hc, spec);
      __m256 lo, hi;
      if (__builtin_expect(any_lane(spec), 0)) {
        decode16_slow(q + i, d, lo, hi);  // lut_h * pow2 = value exactly; then one rounding, as below
        lo = _mm256_mul_ps(_mm256_mul_ps(lo, _mm256_set1_ps(d.pow2)), vs);
        hi = _mm256_mul_ps(_mm256_mul_ps(hi, _mm256_set1_ps(d.pow2)), vs);
      } else {
        half_to_ps(h, lo, hi);
        lo = _mm256_mul_ps(lo, vs2);
        hi = _mm256_mul_ps(hi, vs2);
      }
      store16(lo, hi, out, o + i * esize);
    }
  }
  // tail (and the inexact-scale case): 16 at a time through a zero-padded buffer
  for (; i < n; i += 16) {
    const int64_t cnt = n - i < 16 ? n - i : 16;
    alignas(32) float t[16] = {0};
    for (int64_t j = 0; j < cnt; ++j) t[j] = d.lut_h[q[i + j]] * d.pow2 * scale;
    alignas(32) char buf[64];
    store16(_mm256_load_ps(t), _mm256_load_ps(t + 8), out, buf);
    std::memcpy(o + i * esize, buf, cnt * esize);
  }
}

QK_AVX2 void fp8_encode_avx2(const void* src, FloatKind in, int64_t n, float scale, const MiniFloatEncoder& enc,
                             uint8_t* dst) {
  const EncodeConsts c(enc);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i c0 = encode8(_mm256_div_ps(load8(src, in, i), vs), c);
    const __m256i c1 = encode8(_mm256_div_ps(load8(src, in, i + 8), vs), c);
    const __m256i c2 = encode8(_mm256_div_ps(load8(src, in, i + 16), vs), c);
    const __m256i c3 = encode8(_mm256_div_ps(load8(src, in, i + 24), vs), c);
    // codes are 0..255: the saturating packs keep them; they interleave 128-bit lanes, the permute undoes that
    const __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256((__m256i*)(dst + i), _mm256_permutevar8x32_epi32(p, order));
  }
  for (; i < n; ++i) dst[i] = minifloat_encode(load1(src, in, i) / scale, enc);
}

QK_AVX2 void fp8_mm_rows_avx2(const float* x, int64_t M, const uint8_t* w, const float* bscale, int64_t ldbs,
                              int64_t bb0, int64_t G, int64_t K, const Fp8HalfDecode& d, float* out, int64_t ldo,
                              int64_t n0, int64_t n1) {
  const HalfConsts hc(d);
  const bool grouped = G < K, nan80 = d.nan_code < 0x100;
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const float* srow[NR];
    for (int r = 0; r < NR; ++r) srow[r] = bscale + ((n + r) / bb0) * ldbs;
    const char* pf = pf_here ? (const char*)(w + (n + kRowBlock) * K) : nullptr;
    const float* xm = x + m0 * K;
    float* o = out + m0 * ldo + n;
    if (grouped) {
      if (nan80) f8_tile<NR, MT, true, true>(xm, w + n * K, srow, G, K, d, hc, o, ldo, pf);
      else f8_tile<NR, MT, true, false>(xm, w + n * K, srow, G, K, d, hc, o, ldo, pf);
    } else {
      if (nan80) f8_tile<NR, MT, false, true>(xm, w + n * K, srow, K, K, d, hc, o, ldo, pf);
      else f8_tile<NR, MT, false, false>(xm, w + n * K, srow, K, K, d, hc, o, ldo, pf);
    }
  });
}

QK_AVX2 void fp4_mm_rows_avx2(const float* x, int64_t M, const uint8_t* w, const uint8_t* wscale, int64_t K,
                              const Fp4Decode& d, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t nb = K / d.B;
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = pf_here ? (const char*)(w + (n + kRowBlock) * (K / 2)) : nullptr;
    if (pf_here) prefetch_rows(wscale + (n + kRowBlock) * nb, kRowBlock * nb);
    if (d.B == 16) {
      f4_tile<NR, MT, true>(x + m0 * K, w + n * (K / 2), wscale + n * nb, K, d, out + m0 * ldo + n, ldo, pf);
    } else {
      f4_tile<NR, MT, false>(x + m0 * K, w + n * (K / 2), wscale + n * nb, K, d, out + m0 * ldo + n, ldo, pf);
    }
  });
}

QK_AVX2 void fp4_mm_rows_avx2_i16(const int16_t* xq, int64_t M, const float* xs, int64_t F, const uint8_t* w,
                                  const uint8_t* wscale, int64_t K, const Fp4Decode& d, float* out, int64_t ldo,
                                  int64_t n0, int64_t n1) {
  const int64_t nb = K / d.B;
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = pf_here ? (const char*)(w + (n + kRowBlock) * (K / 2)) : nullptr;
    if (pf_here) prefetch_rows(wscale + (n + kRowBlock) * nb, kRowBlock * nb);
    const int16_t* xm = xq + m0 * K;
    const float* xsm = xs + m0 * (K / F);
    if (d.B == 16) {
      f4i_tile<NR, MT, true>(xm, xsm, F, w + n * (K / 2), wscale + n * nb, K, d, out + m0 * ldo + n, ldo, pf);
    } else {
      f4i_tile<NR, MT, false>(xm, xsm, F, w + n * (K / 2), wscale + n * nb, K, d, out + m0 * ldo + n, ldo, pf);
    }
  });
}

QK_AVX2 void fp4_decode_row_avx2(const uint8_t* p, const uint8_t* s, int64_t K, const Fp4Decode& d, void* dst,
                                 FloatKind out) {
  const __m128i table = _mm_loadu_si128((const __m128i*)d.twice);
  const size_t esize = out == FloatKind::kF32 ? 4 : 2;
  char* o = (char*)dst;
  for (int64_t k = 0; k < K; k += 32) {
    __m256 v[4];
    fp4_twice32<true>(p + k / 2, table, v);
    // value * sc == (2 value) * (sc / 2) exactly when sc / 2 is (a normal fp32, or 0): the same real number, rounded
    // once. Otherwise (subnormal, inf or NaN block scales) the table gives value * sc directly.
    alignas(32) float res[32];
    for (int h = 0; h < 32; h += (int)d.B) {
      const float sc = d.block_scale[s[(k + h) / d.B]];
      const float half = sc * 0.5f;
      if (half == 0.f || std::isnormal(half)) {
        const __m256 vh = _mm256_set1_ps(half);
        for (int j = h / 8; j < (h + (int)d.B) / 8; ++j) _mm256_store_ps(res + 8 * j, _mm256_mul_ps(v[j], vh));
      } else {
        for (int j = h; j < h + (int)d.B; ++j) {
          const uint8_t byte = p[(k + j) / 2];
          const uint8_t c = (j & 1) ? byte >> 4 : byte & 0xF;
          const float twice = (c == 8) ? -0.f : (float)d.twice[c];
          res[j] = twice * 0.5f * sc;
        }
      }
    }
    store16(_mm256_load_ps(res), _mm256_load_ps(res + 8), out, o + k * esize);
    store16(_mm256_load_ps(res + 16), _mm256_load_ps(res + 24), out, o + (k + 16) * esize);
  }
}

}  // namespace cpu
}  // namespace qkernels

#else  // not x86-64: float8.cpp uses its portable loops (cpu_has_avx2_fma() is false)

namespace qkernels {
namespace cpu {
void fp8_decode_avx2(const uint8_t*, int64_t, float, const Fp8HalfDecode&, void*, FloatKind) {}
void fp8_encode_avx2(const void*, FloatKind, int64_t, float, const MiniFloatEncoder&, uint8_t*) {}
void fp8_mm_rows_avx2(const float*, int64_t, const uint8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                      const Fp8HalfDecode&, float*, int64_t, int64_t, int64_t) {}
void fp4_mm_rows_avx2(const float*, int64_t, const uint8_t*, const uint8_t*, int64_t, const Fp4Decode&, float*,
                      int64_t, int64_t, int64_t) {}
void fp4_mm_rows_avx2_i16(const int16_t*, int64_t, const float*, int64_t, const uint8_t*, const uint8_t*, int64_t,
                          const Fp4Decode&, float*, int64_t, int64_t, int64_t) {}
void fp4_decode_row_avx2(const uint8_t*, const uint8_t*, int64_t, const Fp4Decode&, void*, FloatKind) {}
}  // namespace cpu
}  // namespace qkernels

#endif
