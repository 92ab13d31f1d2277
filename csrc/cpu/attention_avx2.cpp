// AVX2/FMA decode attention (contracts in attention_kernels.h). Like int_gemm_avx2.cpp this file includes no torch
// header and only its functions carry the AVX2 target attribute; attention.cpp calls them after the run-time CPU
// check.
//
// Per (sequence, kv head), two passes over the open rows, all math in fp32:
//  1. scores: each k row is loaded and widened once and feeds the dots of every query head sharing it (blocks of
//     up to 3 heads x 4 rows, or 1 head x 8 rows: 8-12 independent FMA chains, so the two FMA pipes do not wait on
//     the 4-cycle latency); the per-row sums are reduced four or eight rows at a time with hadd trees.
//  2. softmax (max subtracted, vectorized exp) and the weighted sum of the v rows, in register blocks of up to 3
//     heads x 32 output columns.
// A one-pass online softmax would read each row once instead of twice, but the rows of one kv head (~25 KiB at 200
// positions of 64 bf16) stay in L1/L2 between the passes, and the plain softmax keeps the reference's sum shape.
// In a decode step the caches come from DRAM (each layer's weights stream through the caches in between), so pass 1
// prefetches the v rows pass 2 reads, and pass 2 the next kv head's k rows. Measured in one process (2026-12-03,
// EPYC VM, SmolLM2 shape, 200 open positions, 30 layers' caches, 64 MiB streamed per step): 25-27 -> 21-22 us per
// call; with every cache hot in L1/L2 the prefetches cost ~1-3 us (12 -> 13-15 us).
#include "attention_kernels.h"

#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx2_tiles.h"

// GCC keeps a register block's accumulator array in registers only when every loop over it is fully unrolled;
// otherwise it also stores the array to the stack on every row (seen in pv_chunks: ~2x slower).
#define QK_UNROLL _Pragma("GCC unroll 16")

namespace qkernels {
namespace cpu {
namespace {

// 16-bit element tags (the bits of a bf16 / fp16 value), so the loads and stores below overload on the pointer type
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

QK_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
QK_AVX2 inline __m256 load8(const Bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
QK_AVX2 inline __m256 load8(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// The first r (< 8) elements and zeros after: a row's tail, without reading past the row (the next row of the
// cache may be a closed slot holding NaN; the last row of the tensor may end the allocation).
template <typename T>
QK_AVX2 inline __m256 load_part(const T* p, int r) {
  T buf[8];
  std::memset(buf, 0, sizeof(buf));
  std::memcpy(buf, p, (size_t)r * sizeof(T));
  return load8(buf);
}

QK_AVX2 inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
// Round to nearest even as c10::BFloat16 does; NaN becomes 0x7FC0 as there (the rounding carry would turn a NaN
// whose payload sits in the low half into inf).
QK_AVX2 inline void store8(Bf16* p, __m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
QK_AVX2 inline void store8(F16* p, __m256 x) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T>
QK_AVX2 inline void store_part(T* p, __m256 x, int r) {
  T buf[8];
  store8(buf, x);
  std::memcpy(p, buf, (size_t)r * sizeof(T));
}

// The softmax weights exp(x) for x = s - max <= 0 (larger x is clamped to 0; it only occurs where a NaN score
// makes the row NaN anyway), after Cephes' expf: x = n ln2 + r with ln2 split in two parts so n ln2 is exact,
// exp(r) by its degree-5 minimax polynomial (~1-2 ulp), times 2^n built in the exponent field. x < -87.34 (a
// result below FLT_MIN) gives 0, not a subnormal: at most 1.2e-38 off, in a sum whose largest term is 1. NaN stays
// NaN; -inf (a padding lane) gives 0.
QK_AVX2 inline __m256 softmax_exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_setzero_ps());  // NaN -> lo, restored below
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // in [-126, 0]
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

QK_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// [sum(a), sum(b), sum(c), sum(d)]
QK_AVX2 inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// [sum(a[0]), ..., sum(a[7])]
QK_AVX2 inline __m256 reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Every cache line of one row of D elements.
template <typename T>
QK_AVX2 inline void prefetch_row(const T* row, int64_t D) {
  const char* p = (const char*)row;
  const char* last = p + D * (int64_t)sizeof(T) - 1;
  for (; p < last; p += 64) _mm_prefetch(p, _MM_HINT_T0);
  _mm_prefetch(last, _MM_HINT_T0);
}

template <typename T>
QK_AVX2 inline const T* row_at(const T* base, const int32_t* idx, int64_t i, int64_t D) {
  return base + (idx ? (int64_t)idx[i] : i) * D;
}

// s[g * ls + i] = qf[g, :8 nc] . k[idx[i], :8 nc] (the whole 8-column chunks) for the GB heads of qf (fp32, rows
// Dp apart) and the n open rows, R rows at a time (R = 4 or 8). No tail handling in here: a row's partial chunk
// needs a copying load, and that kept GCC from holding the accumulators in registers (qk_tail adds it).
// pf (nullptr: none): rows of the same positions to prefetch along (the v rows the next pass reads).
template <int GB, int R, typename T>
QK_AVX2 void qk_dots(const float* qf, int64_t Dp, const T* k, int64_t D, const int32_t* idx, int64_t n, float* s,
                     int64_t ls, const T* pf) {
  static_assert(R == 4 || R == 8, "rows are reduced 4 or 8 at a time");
  const int64_t nc = D / 8;
  int64_t i = 0;
  for (; i + R <= n; i += R) {
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = row_at(k, idx, i + r, D);
    if (pf)
      for (int r = 0; r < R; ++r) prefetch_row(row_at(pf, idx, i + r, D), D);
    __m256 acc[GB][R];
    for (int g = 0; g < GB; ++g)
      for (int r = 0; r < R; ++r) acc[g][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nc; ++c)
      for (int r = 0; r < R; ++r) {
        const __m256 kv = load8(rows[r] + c * 8);
        for (int g = 0; g < GB; ++g) acc[g][r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * Dp + c * 8), kv, acc[g][r]);
      }
    for (int g = 0; g < GB; ++g) {
      if constexpr (R == 8) _mm256_storeu_ps(s + g * ls + i, reduce8(acc[g]));
      else _mm_storeu_ps(s + g * ls + i, reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
    }
  }
  for (; i < n; ++i) {
    const T* row = row_at(k, idx, i, D);
    __m256 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      const __m256 kv = load8(row + c * 8);
      for (int g = 0; g < GB; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * Dp + c * 8), kv, acc[g]);
    }
    for (int g = 0; g < GB; ++g) s[g * ls + i] = hsum(acc[g]);
  }
}

// s[g * ls + i] += the dot of the last, partial chunk (D % 8 columns; qf is zero-padded there) for all G heads.
template <typename T>
QK_AVX2 void qk_tail(const float* qf, int64_t Dp, int64_t G, const T* k, int64_t D, const int32_t* idx, int64_t n,
                     float* s, int64_t ls) {
  const int64_t c0 = D / 8 * 8;
  for (int64_t i = 0; i < n; ++i) {
    const __m256 kv = load_part(row_at(k, idx, i, D) + c0, (int)(D - c0));
    for (int64_t g = 0; g < G; ++g) s[g * ls + i] += hsum(_mm256_mul_ps(_mm256_loadu_ps(qf + g * Dp + c0), kv));
  }
}

// out[g, 8 c0 : 8 (c0 + CB)] = sum_i p[g * ls + i] v[idx[i], same columns] / denom[g] for the GB heads and CB whole
// column chunks of 8; heads with denom 0 get zeros.
// pf (nullptr: none): rows of the same positions to prefetch along (the next kv head's k rows).
template <int GB, int CB, typename T>
QK_AVX2 void pv_chunks(const float* p, int64_t ls, const T* v, int64_t D, const int32_t* idx, int64_t n, int64_t c0,
                       const float* denom, T* out, const T* pf) {
  __m256 acc[GB][CB];
  QK_UNROLL
  for (int g = 0; g < GB; ++g)
    QK_UNROLL
    for (int c = 0; c < CB; ++c) acc[g][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const T* row = row_at(v, idx, i, D) + c0 * 8;
    if (pf) prefetch_row(row_at(pf, idx, i, D), D);
    // GB * CB accumulators + GB weights + one v chunk <= 15 registers: a spilled accumulator puts a store-to-load
    // round trip into its FMA chain (measured: 3x slower with 12 accumulators + 4 held v chunks)
    __m256 pb[GB];
    QK_UNROLL
    for (int g = 0; g < GB; ++g) pb[g] = _mm256_broadcast_ss(p + g * ls + i);
    QK_UNROLL
    for (int c = 0; c < CB; ++c) {
      const __m256 vv = load8(row + c * 8);
      QK_UNROLL
      for (int g = 0; g < GB; ++g) acc[g][c] = _mm256_fmadd_ps(pb[g], vv, acc[g][c]);
    }
  }
  QK_UNROLL
  for (int g = 0; g < GB; ++g) {
    // division, not a reciprocal's product: the reference's rounding
    const __m256 den = _mm256_set1_ps(denom[g]);
    QK_UNROLL
    for (int c = 0; c < CB; ++c)
      store8(out + g * D + (c0 + c) * 8, denom[g] == 0.f ? _mm256_setzero_ps() : _mm256_div_ps(acc[g][c], den));
  }
}

// The last, partial column chunk (D % 8 columns) of pv_chunks, for all G heads.
template <typename T>
QK_AVX2 void pv_tail(const float* p, int64_t ls, int64_t G, const T* v, int64_t D, const int32_t* idx, int64_t n,
                     const float* denom, T* out) {
  const int64_t c0 = D / 8 * 8;
  const int r = (int)(D - c0);
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; ++i)
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * ls + i), load_part(row_at(v, idx, i, D) + c0, r), acc);
    store_part(out + g * D + c0, denom[g] == 0.f ? _mm256_setzero_ps() : _mm256_div_ps(acc, _mm256_set1_ps(denom[g])),
               r);
  }
}

// Query heads in register blocks: 3 while that leaves no block of 1 (G = 3, 5, 6, 7, 9, ...), else 2, else 1.
QK_AVX2 inline int head_block(int64_t left) { return left >= 3 && left != 4 ? 3 : left >= 2 ? 2 : 1; }

// The last `left` (< CB) column chunks as one block of that size.
template <int GB, int CB, typename T>
QK_AVX2 void pv_rest(const float* p, int64_t ls, const T* v, int64_t D, const int32_t* idx, int64_t n, int64_t c0,
                     int64_t left, const float* denom, T* out, const T* pf) {
  if constexpr (CB > 0) {
    if (left == CB) pv_chunks<GB, CB>(p, ls, v, D, idx, n, c0, denom, out, pf);
    else pv_rest<GB, CB - 1>(p, ls, v, D, idx, n, c0, left, denom, out, pf);
  }
}

// Column chunks in blocks of CB (GB * CB accumulators + GB weights + a v chunk: at most 15 registers).
// pf: prefetched along the first pass over the rows.
template <int GB, int CB, typename T>
QK_AVX2 void pv_heads(const float* p, int64_t ls, const T* v, int64_t D, const int32_t* idx, int64_t n,
                      const float* denom, T* out, const T* pf) {
  static_assert(GB * CB + GB + 1 <= 15, "register budget");
  const int64_t nc = D / 8;
  int64_t c0 = 0;
  for (; c0 + CB <= nc; c0 += CB, pf = nullptr) pv_chunks<GB, CB>(p, ls, v, D, idx, n, c0, denom, out, pf);
  pv_rest<GB, CB - 1>(p, ls, v, D, idx, n, c0, nc - c0, denom, out, pf);
}

template <typename T>
QK_AVX2 void kv_head(const T* q, const T* k, const T* v, int64_t G, int64_t D, const int32_t* idx, const float* madd,
                     int64_t n, float scale, float* scratch, T* out, const T* next_k) {
  if (n == 0) {  // no open position: zeros (all-zero bits in every element type)
    std::memset((void*)out, 0, (size_t)(G * D) * sizeof(T));
    return;
  }
  const int64_t Dp = (D + 7) / 8 * 8, ls = (n + 7) / 8 * 8;
  float* qf = scratch;
  float* s = qf + G * Dp;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < Dp; c += 8)
      _mm256_storeu_ps(qf + g * Dp + c, D - c >= 8 ? load8(q + g * D + c) : load_part(q + g * D + c, (int)(D - c)));
  for (int64_t g0 = 0; g0 < G;) {
    const int gb = head_block(G - g0);
    const T* pf = g0 == 0 ? v : nullptr;
    if (gb == 3) qk_dots<3, 4>(qf + g0 * Dp, Dp, k, D, idx, n, s + g0 * ls, ls, pf);
    else if (gb == 2) qk_dots<2, 4>(qf + g0 * Dp, Dp, k, D, idx, n, s + g0 * ls, ls, pf);
    else qk_dots<1, 8>(qf + g0 * Dp, Dp, k, D, idx, n, s + g0 * ls, ls, pf);
    g0 += gb;
  }
  if (D % 8) qk_tail(qf, Dp, G, k, D, idx, n, s, ls);
  // scores = scale * dot + mask (two roundings, as the reference), then the softmax numerators in place; the
  // padding lanes [n, ls) get -inf, so their weights are 0
  float* denom = qf;  // q is not needed any more
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * ls;
    __m256 m = _mm256_set1_ps(ninf);
    for (int64_t i = 0; i < ls; i += 8) {
      __m256 x = _mm256_mul_ps(_mm256_loadu_ps(sg + i), vscale);
      if (madd) x = _mm256_add_ps(x, _mm256_loadu_ps(madd + i));
      // lanes past n (uninitialized scores, madd's spare entries) -> -inf
      if (i + 8 > n)
        x = _mm256_blendv_ps(x, _mm256_set1_ps(ninf), _mm256_cmp_ps(lane, _mm256_set1_ps((float)(n - i)), _CMP_GE_OQ));
      _mm256_storeu_ps(sg + i, x);
      m = _mm256_max_ps(m, x);
    }
    float mx = hmax(m);
    if (mx == ninf) mx = 0.f;  // every score -inf: all weights 0 -> zeros
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < ls; i += 8) {
      const __m256 e = softmax_exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + i), vmx));
      _mm256_storeu_ps(sg + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    denom[g] = hsum(sum);
  }
  for (int64_t g0 = 0; g0 < G;) {
    const int gb = head_block(G - g0);
    const float* pg = s + g0 * ls;
    const T* pf = g0 == 0 ? next_k : nullptr;
    if (gb == 3) pv_heads<3, 3>(pg, ls, v, D, idx, n, denom + g0, out + g0 * D, pf);
    else if (gb == 2) pv_heads<2, 5>(pg, ls, v, D, idx, n, denom + g0, out + g0 * D, pf);
    else pv_heads<1, 8>(pg, ls, v, D, idx, n, denom + g0, out + g0 * D, pf);
    g0 += gb;
  }
  if (D % 8) pv_tail(s, ls, G, v, D, idx, n, denom, out);
}

template <typename T>
QK_AVX2 int64_t open_positions(const T* m, int64_t L, float lowest, int32_t* idx, float* madd) {
  const __m256 lo = _mm256_set1_ps(lowest);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t n = 0;
  for (int64_t l = 0; l < L; l += 8) {
    const int w = L - l < 8 ? (int)(L - l) : 8;
    const __m256 x = w == 8 ? load8(m + l) : load_part(m + l, w);
    // ordered compare: NaN is not closed (it reaches the output, as in the reference)
    unsigned open = ~(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x, lo, _CMP_LE_OQ)) & ((1u << w) - 1);
    if (open == 0xFFu) {  // the common case (a run of open positions): two stores
      _mm256_storeu_si256((__m256i*)(idx + n), _mm256_add_epi32(_mm256_set1_epi32((int32_t)l), lane));
      _mm256_storeu_ps(madd + n, x);
      n += 8;
    } else if (open) {
      float xs[8];
      _mm256_storeu_ps(xs, x);
      for (; open; open &= open - 1) {
        const int j = __builtin_ctz(open);
        idx[n] = (int32_t)(l + j);
        madd[n++] = xs[j];
      }
    }
  }
  return n;
}

}  // namespace

int64_t attention_open_positions_avx2(const void* m, AttnElem elem, int64_t L, float lowest, int32_t* idx,
                                      float* madd) {
  switch (elem) {
    case AttnElem::kF32: return open_positions((const float*)m, L, lowest, idx, madd);
    case AttnElem::kBF16: return open_positions((const Bf16*)m, L, lowest, idx, madd);
    case AttnElem::kF16: return open_positions((const F16*)m, L, lowest, idx, madd);
  }
  return 0;
}

void decode_attention_kv_head_avx2(const void* q, const void* k, const void* v, AttnElem elem, int64_t G, int64_t D,
                                   const int32_t* idx, const float* madd, int64_t n, float scale, float* scratch,
                                   void* out, const void* next_k) {
  switch (elem) {
    case AttnElem::kF32:
      kv_head((const float*)q, (const float*)k, (const float*)v, G, D, idx, madd, n, scale, scratch, (float*)out,
              (const float*)next_k);
      break;
    case AttnElem::kBF16:
      kv_head((const Bf16*)q, (const Bf16*)k, (const Bf16*)v, G, D, idx, madd, n, scale, scratch, (Bf16*)out,
              (const Bf16*)next_k);
      break;
    case AttnElem::kF16:
      kv_head((const F16*)q, (const F16*)k, (const F16*)v, G, D, idx, madd, n, scale, scratch, (F16*)out,
              (const F16*)next_k);
      break;
  }
}

}  // namespace cpu
}  // namespace qkernels

#else  // not x86-64: cpu_has_avx2_fma() is false and attention.cpp runs its portable loops

namespace qkernels {
namespace cpu {
int64_t attention_open_positions_avx2(const void*, AttnElem, int64_t, float, int32_t*, float*) { return 0; }
void decode_attention_kv_head_avx2(const void*, const void*, const void*, AttnElem, int64_t, int64_t, const int32_t*,
                                   const float*, int64_t, float, float*, void*, const void*) {}
}  // namespace cpu
}  // namespace qkernels

#endif
