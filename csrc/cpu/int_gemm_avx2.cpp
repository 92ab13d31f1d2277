// AVX2/FMA micro-kernels for the small-M (decode) integer GEMMs.
//
// This file is compiled with the baseline flags like every other one; only the functions below carry
// target("avx2,fma"), and int_gemm.cpp calls them after a run-time CPU check. It deliberately includes no torch
// header: inline functions from a header compiled here with AVX2 enabled could be picked by the linker for callers
// on CPUs without AVX2.
#include "int_gemm_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define QK_AVX2 __attribute__((target("avx2,fma")))

namespace qkernels {
namespace cpu {

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

namespace {

QK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

QK_AVX2 inline __m256 i8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// MT rows of x against one row of W, all groups. Weight codes are decoded once per 32 elements and reused by the
// MT rows. Decode: the 16 code bytes are broadcast to both 128-bit lanes and one pshufb spreads 8 of them into
// 32-bit lanes (zero-extended); "& 0xF" gives the low nibbles, ">> 4" the high ones, and cvtdq2ps makes floats:
// about 15 uops per 32 weights instead of ~24 for sign-extending int8 (pmovsxbd is 2 uops on Zen). The codes are
// unsigned here (value + 8 for signed nibbles, via xor_mask), so the zero point is applied per group as
// sum_k (u_k - zz) x_k = sum_k u_k x_k - zz * sum_k x_k, with the group sums of x precomputed once per call.
template <int MT>
QK_AVX2 void w4_row(const float* xp, int64_t ldx, const float* xsum, const uint8_t* wrow, const float* srow,
                    const int8_t* zrow, int64_t K, int64_t group_size, uint8_t xor_mask, float* acc_out) {
  const __m256i idx0 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,  //
                                        4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
  const __m256i idx1 = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,  //
                                        12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
  const __m256i nib = _mm256_set1_epi32(0x0F);
  const __m256i flip = _mm256_set1_epi8((char)xor_mask);
  const int64_t G = K / group_size;
  __m256 total[MT];
  float corr[MT];
  for (int m = 0; m < MT; ++m) {
    total[m] = _mm256_setzero_ps();
    corr[m] = 0.f;
  }
  for (int64_t g = 0; g < G; ++g) {
    // independent accumulators hide the FMA latency (4 chains for one or two rows, 2 otherwise)
    constexpr int NA = MT <= 2 ? 4 : 2;
    __m256 a[MT][NA];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < NA; ++j) a[m][j] = _mm256_setzero_ps();
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
      const __m256i b =
          _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(wrow + k / 2))), flip);
      const __m256i v0 = _mm256_shuffle_epi8(b, idx0), v1 = _mm256_shuffle_epi8(b, idx1);
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, nib));   // elements k, k+2, ..., k+14
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, nib));   // elements k+16, ..., k+30
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));    // elements k+1, ..., k+15
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));    // elements k+17, ..., k+31
      for (int m = 0; m < MT; ++m) {
        const float* xk = xp + m * ldx + k;  // x permuted per 32-block: evens then odds
        a[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), a[m][0]);
        a[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), a[m][1]);
        a[m][2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xk + 16), a[m][2 % NA]);
        a[m][3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xk + 24), a[m][3 % NA]);
      }
    }
    const float sg = srow[g];
    const __m256 s = _mm256_set1_ps(sg);
    const float zs = sg * (float)zrow[g];
    for (int m = 0; m < MT; ++m) {
      __m256 sum = _mm256_add_ps(a[m][0], a[m][1]);
      if (NA == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(a[m][2 % NA], a[m][3 % NA]));
      total[m] = _mm256_fmadd_ps(s, sum, total[m]);
      corr[m] += zs * xsum[m * G + g];
    }
  }
  for (int m = 0; m < MT; ++m) acc_out[m] = hsum(total[m]) - corr[m];
}

template <int MT>
QK_AVX2 void w8_row(const float* x, int64_t ldx, const int8_t* wrow, int64_t K, float* acc_out) {
  constexpr int NA = MT <= 2 ? 4 : 2;
  __m256 a[MT][NA];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NA; ++j) a[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m128i b0 = _mm_loadu_si128((const __m128i*)(wrow + k));
    __m128i b1 = _mm_loadu_si128((const __m128i*)(wrow + k + 16));
    __m256 w0 = i8x8_to_ps(b0), w1 = i8x8_to_ps(_mm_srli_si128(b0, 8));
    __m256 w2 = i8x8_to_ps(b1), w3 = i8x8_to_ps(_mm_srli_si128(b1, 8));
    for (int m = 0; m < MT; ++m) {
      const float* xk = x + m * ldx + k;
      a[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), a[m][0]);
      a[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), a[m][1]);
      a[m][2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xk + 16), a[m][2 % NA]);
      a[m][3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xk + 24), a[m][3 % NA]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 sum = _mm256_add_ps(a[m][0], a[m][1]);
    if (NA == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(a[m][2 % NA], a[m][3 % NA]));
    acc_out[m] = hsum(sum);
  }
}

// int8 x int8 -> int32 dot products, 32 at a time. maddubs wants (unsigned, signed): use |w| as the unsigned side
// (|-128| = 128 is exact as u8) and move w's sign onto x (x is in [-127, 127], so negating it cannot overflow).
// Pairs sum to at most 2*128*127 = 32512 < 2^15: no int16 saturation.
template <int MT>
QK_AVX2 void i8_row(const int8_t* xq, int64_t ldx, const int8_t* wrow, int64_t K, int32_t* acc_out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 32) {
    __m256i w = _mm256_loadu_si256((const __m256i*)(wrow + k));
    __m256i aw = _mm256_abs_epi8(w);
    for (int m = 0; m < MT; ++m) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * ldx + k));
      __m256i sx = _mm256_sign_epi8(xv, w);
      __m256i p16 = _mm256_maddubs_epi16(aw, sx);
      acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p16, ones));
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[m]), _mm256_extracti128_si256(acc[m], 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    acc_out[m] = _mm_cvtsi128_si32(s);
  }
}

}  // namespace

QK_AVX2 void w4a16_rows_avx2(const float* xp, int64_t M, int64_t ldx, const float* xsum, const uint8_t* w,
                             const float* scale, const int8_t* zz, int64_t K, int64_t group_size, uint8_t xor_mask,
                             float* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t G = K / group_size;
  float acc[4];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = w + n * (K / 2);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = M - m0 < 4 ? M - m0 : 4;
      const float* xm = xp + m0 * ldx;
      switch (mt) {
        case 1: w4_row<1>(xm, ldx, xsum + m0 * G, wrow, scale + n * G, zz + n * G, K, group_size, xor_mask, acc); break;
        case 2: w4_row<2>(xm, ldx, xsum + m0 * G, wrow, scale + n * G, zz + n * G, K, group_size, xor_mask, acc); break;
        case 3: w4_row<3>(xm, ldx, xsum + m0 * G, wrow, scale + n * G, zz + n * G, K, group_size, xor_mask, acc); break;
        default: w4_row<4>(xm, ldx, xsum + m0 * G, wrow, scale + n * G, zz + n * G, K, group_size, xor_mask, acc); break;
      }
      for (int64_t m = 0; m < mt; ++m) out[(m0 + m) * ldo + n] = acc[m];
    }
  }
}

QK_AVX2 void w8a16_rows_avx2(const float* x, int64_t M, int64_t ldx, const int8_t* w, const float* scale, int64_t K,
                             float* out, int64_t ldo, int64_t n0, int64_t n1) {
  float acc[4];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = M - m0 < 4 ? M - m0 : 4;
      const float* xm = x + m0 * ldx;
      switch (mt) {
        case 1: w8_row<1>(xm, ldx, wrow, K, acc); break;
        case 2: w8_row<2>(xm, ldx, wrow, K, acc); break;
        case 3: w8_row<3>(xm, ldx, wrow, K, acc); break;
        default: w8_row<4>(xm, ldx, wrow, K, acc); break;
      }
      for (int64_t m = 0; m < mt; ++m) out[(m0 + m) * ldo + n] = acc[m] * scale[n];
    }
  }
}

QK_AVX2 void w4_dequant_rows_avx2(const uint8_t* w, const float* scale, const int8_t* zz, int64_t K,
                                  int64_t group_size, uint8_t xor_mask, float* dst, int64_t n0, int64_t n1) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i flip = _mm_set1_epi8((char)xor_mask);
  const int64_t G = K / group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = w + n * (K / 2);
    float* out = dst + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m128i z = _mm_set1_epi8(zz[n * G + g]);
      const __m256 s = _mm256_set1_ps(scale[n * G + g]);
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
        __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(wrow + k / 2)), flip);
        __m128i lo = _mm_sub_epi8(_mm_and_si128(b, nib), z);
        __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), nib), z);
        __m128i e0 = _mm_unpacklo_epi8(lo, hi), e1 = _mm_unpackhi_epi8(lo, hi);  // back to natural order
        _mm256_storeu_ps(out + k, _mm256_mul_ps(s, i8x8_to_ps(e0)));
        _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(s, i8x8_to_ps(_mm_srli_si128(e0, 8))));
        _mm256_storeu_ps(out + k + 16, _mm256_mul_ps(s, i8x8_to_ps(e1)));
        _mm256_storeu_ps(out + k + 24, _mm256_mul_ps(s, i8x8_to_ps(_mm_srli_si128(e1, 8))));
      }
    }
  }
}

QK_AVX2 void w8_dequant_rows_avx2(const int8_t* w, const float* scale, int64_t K, float* dst, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const __m256 s = _mm256_set1_ps(scale[n]);
    const int8_t* wrow = w + n * K;
    float* out = dst + (n - n0) * K;
    for (int64_t k = 0; k < K; k += 16) {
      __m128i b = _mm_loadu_si128((const __m128i*)(wrow + k));
      _mm256_storeu_ps(out + k, _mm256_mul_ps(s, i8x8_to_ps(b)));
      _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(s, i8x8_to_ps(_mm_srli_si128(b, 8))));
    }
  }
}

QK_AVX2 void i8i8_rows_avx2(const int8_t* xq, int64_t M, int64_t ldx, const int8_t* w, int64_t K, int32_t* out,
                            int64_t ldo, int64_t n0, int64_t n1) {
  int32_t acc[4];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = M - m0 < 4 ? M - m0 : 4;
      const int8_t* xm = xq + m0 * ldx;
      switch (mt) {
        case 1: i8_row<1>(xm, ldx, wrow, K, acc); break;
        case 2: i8_row<2>(xm, ldx, wrow, K, acc); break;
        case 3: i8_row<3>(xm, ldx, wrow, K, acc); break;
        default: i8_row<4>(xm, ldx, wrow, K, acc); break;
      }
      for (int64_t m = 0; m < mt; ++m) out[(m0 + m) * ldo + n] = acc[m];
    }
  }
}

}  // namespace cpu
}  // namespace qkernels

#else  // not x86-64: no AVX2 kernels, int_gemm.cpp uses its portable paths

namespace qkernels {
namespace cpu {
bool cpu_has_avx2_fma() { return false; }
void w4a16_rows_avx2(const float*, int64_t, int64_t, const float*, const uint8_t*, const float*, const int8_t*,
                     int64_t, int64_t, uint8_t, float*, int64_t, int64_t, int64_t) {}
void w8a16_rows_avx2(const float*, int64_t, int64_t, const int8_t*, const float*, int64_t, float*, int64_t, int64_t,
                     int64_t) {}
void i8i8_rows_avx2(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*, int64_t, int64_t, int64_t) {}
void w4_dequant_rows_avx2(const uint8_t*, const float*, const int8_t*, int64_t, int64_t, uint8_t, float*, int64_t,
                          int64_t) {}
void w8_dequant_rows_avx2(const int8_t*, const float*, int64_t, float*, int64_t, int64_t) {}
}  // namespace cpu
}  // namespace qkernels

#endif
