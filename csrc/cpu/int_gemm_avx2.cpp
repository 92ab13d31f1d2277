// AVX2/FMA micro-kernels for the small-M (decode) integer GEMMs.
//
// This file is compiled with the baseline flags like every other one; only the functions below carry
// target("avx2,fma,f16c") (QK_AVX2, avx2_tiles.h), and int_gemm.cpp calls them after a run-time CPU check. It deliberately includes no torch
// header: inline functions from a header compiled here with AVX2 enabled could be picked by the linker for callers
// on CPUs without AVX2.
#include "int_gemm_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx2_tiles.h"

namespace qkernels {
namespace cpu {

bool cpu_has_avx2_fma() {
  // f16c: the fp8 / fp4 kernels (float_avx2.cpp) convert through fp16; every AVX2 CPU so far has it
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

namespace {

QK_AVX2 inline float hsum_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

QK_AVX2 inline __m256 i8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// The per-group scales and zero points of the next 4-row block (4 * K/g values each, a few cache lines per row)
// are separate streams that the hardware prefetcher does not follow either: without this, their misses cost the
// int4 kernel ~10-20% at M = 1 with weights from DRAM (2026-11, Zen 3, 11008 x 4096, g128).
// The int4 tiles' prefetch: with pf_here, the next 4-row block's scales and zero points now, and its weights (the
// returned pointer, nullptr otherwise) step by step inside the tile.
// d: how many blocks ahead (pf_blocks()).
template <typename Z>
QK_AVX2 inline const char* int4_block_prefetch(const uint8_t* w, const float* scale, const Z* zero_point, int64_t n,
                                               int64_t ldw, int64_t G, bool pf_here, int64_t d) {
  if (!pf_here) return nullptr;
  const int64_t nn = n + d * kRowBlock;
  prefetch_rows(scale + nn * G, kRowBlock * G);
  if (zero_point) prefetch_rows(zero_point + nn * G, kRowBlock * G);
  return (const char*)(w + nn * ldw);
}

// The integer kernels' prefetch distance in 4-row blocks: QKERNELS_CPU_PF_BLOCKS (1-16, default 1: the block
// right after the one being computed), read per call so a benchmark can compare distances in one process.
int64_t pf_blocks() {
  const char* e = std::getenv("QKERNELS_CPU_PF_BLOCKS");
  if (e == nullptr || *e == '\0') return 1;
  const long v = std::strtol(e, nullptr, 10);
  return v < 1 ? 1 : v > 16 ? 16 : v;
}

// QKERNELS_CPU_ZP_TAIL=scalar: the zero-point correction's last G % 8 groups in the scalar loop (before 2026-12-04)
// instead of one masked vector step; read per call, for same-process A/B (see zero_point_correction).
bool zp_vector_tail() {
  const char* e = std::getenv("QKERNELS_CPU_ZP_TAIL");
  return e == nullptr || std::strcmp(e, "scalar") != 0;
}

// A ragged x (kend < K: the steps past kend multiply zeros and are skipped) ends its tile early: the next block's
// lines that those steps would have prefetched, `lines_per_step` per step of `step` k, from step kend / step on.
QK_AVX2 inline void prefetch_skipped_steps(const char* pf, int64_t kend, int64_t K, int64_t step, int lines_per_step) {
  if (!pf) return;
  for (int64_t s = kend / step; s < K / step; ++s)
    for (int l = 0; l < lines_per_step; ++l) _mm_prefetch(pf + (s * lines_per_step + l) * kPrefetchStep, _MM_HINT_T0);
}

template <int NR, int MT>
constexpr int kChains = NR * MT >= 8 ? 1 : 2;

// corr[m] = sum_g scale[g] * (zp[g] + zoff) * xsum[m * G + g] for one weight row (zp nullptr: zero points 0), eight
// groups per vector op. As a scalar loop this was a latency-bound chain of dependent adds per row (the compiler may
// not reorder float sums), ~20% of the int4 kernel's time at M = 1 with g128. Returns true when a zero point lies
// outside [-8, 16].
// vtail: the last G % 8 groups as one masked vector step too (masked lanes load 0: scale 0, zero point 0, in range)
// instead of a scalar loop of dependent adds, which cost ~10 ns per weight row for K = 576 / 640 with g128 (G = 5, no
// full vector step at all): a large share of the int4 x int16 kernel's per-row time at the decode shapes. The sum
// order differs (lanes, then the horizontal sum), so outputs may move by an ulp of the correction;
// QKERNELS_CPU_ZP_TAIL=scalar keeps the scalar loop for same-process A/B.
template <int MT>
QK_AVX2 inline bool zero_point_correction(const float* scale, const int32_t* zp, int32_t zoff, const float* xsum,
                                          int64_t G, float corr[MT], bool vtail) {
  __m256 c[MT];
  for (int m = 0; m < MT; ++m) c[m] = _mm256_setzero_ps();
  const __m256i off = _mm256_set1_epi32(zoff), eight = _mm256_set1_epi32(8), hi = _mm256_set1_epi32(24);
  __m256i badv = _mm256_setzero_si256();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    __m256 zf = _mm256_cvtepi32_ps(off);
    if (zp) {
      const __m256i z = _mm256_loadu_si256((const __m256i*)(zp + g));
      const __m256i z8 = _mm256_add_epi32(z, eight);  // valid: 0 <= z + 8 <= 24
      badv = _mm256_or_si256(badv, _mm256_or_si256(_mm256_cmpgt_epi32(z8, hi),
                                                   _mm256_cmpgt_epi32(_mm256_setzero_si256(), z8)));
      zf = _mm256_cvtepi32_ps(_mm256_add_epi32(z, off));
    }
    const __m256 zs = _mm256_mul_ps(_mm256_loadu_ps(scale + g), zf);
    for (int m = 0; m < MT; ++m) c[m] = _mm256_fmadd_ps(zs, _mm256_loadu_ps(xsum + m * G + g), c[m]);
  }
  if (vtail && g < G) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(G - g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 zf = _mm256_cvtepi32_ps(off);
    if (zp) {
      const __m256i z = _mm256_maskload_epi32(zp + g, mask);
      const __m256i z8 = _mm256_add_epi32(z, eight);
      badv = _mm256_or_si256(badv, _mm256_or_si256(_mm256_cmpgt_epi32(z8, hi),
                                                   _mm256_cmpgt_epi32(_mm256_setzero_si256(), z8)));
      zf = _mm256_cvtepi32_ps(_mm256_add_epi32(z, off));
    }
    const __m256 zs = _mm256_mul_ps(_mm256_maskload_ps(scale + g, mask), zf);
    for (int m = 0; m < MT; ++m) c[m] = _mm256_fmadd_ps(zs, _mm256_maskload_ps(xsum + m * G + g, mask), c[m]);
    g = G;
  }
  bool bad = !_mm256_testz_si256(badv, badv);
  for (int m = 0; m < MT; ++m) corr[m] = hsum(c[m]);
  for (; g < G; ++g) {
    const int32_t z = zp ? zp[g] : 0;
    bad |= (uint32_t)(z + 8) > 24u;
    const float zs = scale[g] * (float)(z + zoff);
    for (int m = 0; m < MT; ++m) corr[m] += zs * xsum[m * G + g];
  }
  return bad;
}

// End of a quantization group in the int4 tiles: total[r][m] += scale[r, g] * (sum of the group's FMA chains).
template <int NR, int MT, int C1>
QK_AVX2 inline void fold_group(__m256 (&total)[NR][MT], const __m256 (&a)[NR][MT][2], const float* scale, int64_t G,
                               int64_t g) {
  for (int r = 0; r < NR; ++r) {
    const __m256 s = _mm256_set1_ps(scale[r * G + g]);
    for (int m = 0; m < MT; ++m)
      total[r][m] = _mm256_fmadd_ps(s, C1 ? _mm256_add_ps(a[r][m][0], a[r][m][1]) : a[r][m][0], total[r][m]);
  }
}

// End of an int4 tile: out[m, r] = (sum(total[r][m]) - zero-point correction) * row_scale[m] (nullptr: 1); true when a
// zero point lies outside [-8, 16].
template <int NR, int MT>
QK_AVX2 inline bool finish_int4_tile(const __m256 (&total)[NR][MT], const float* scale, const int32_t* zp,
                                     int32_t zoff, const float* xsum, const float* row_scale, int64_t G, float* out,
                                     int64_t ldo, bool vtail) {
  bool bad = false;
  for (int r = 0; r < NR; ++r) {
    float corr[MT];
    bad |= zero_point_correction<MT>(scale + r * G, zp ? zp + r * G : nullptr, zoff, xsum, G, corr, vtail);
    for (int m = 0; m < MT; ++m) out[m * ldo + r] = (hsum(total[r][m]) - corr[m]) * (row_scale ? row_scale[m] : 1.f);
  }
  return bad;
}

// int4: per 32-k step and weight row, the 16 code bytes are broadcast to both 128-bit lanes and two pshufb put
// bytes 0-7 and 8-15 into the top byte of 32-bit lanes. There a nibble is the sign-carrying top of an int32: the high
// nibble (& 0xF0000000) and the low one (<< 4) become q * 2^28 exactly, sign included, so cvtdq2ps gives signed codes
// without a sign-extension step (unsigned codes are XOR'd with 0x88 first: u - 8). x comes scaled by 2^-28 (and by a
// power of two per row that keeps it far from fp32 under/overflow; int4_prepare_x), so every product equals the
// unscaled one. Centred codes also keep the zero-point correction small: the kernel sums q x per group and subtracts
// (zero_point - code offset) * sum(x) per group, which is zero for symmetric signed weights and at most 8 * sum(x)
// otherwise (u_k = q_k + 8 with a correction of zz * sum(x) cancels much more). x is permuted to match the decode
// order: per 16-block, the 8 even elements then the 8 odd ones. Returns true when a zero point lies outside
// [-8, 16] (the range of the other paths, checked here so that no separate pass over the zero points is needed).
template <int NR, int MT, bool FLIP>
QK_AVX2 bool w4_tile(const float* xp, const float* xsum, const float* row_scale, const uint8_t* w, const float* scale,
                     const int32_t* zp, int32_t zoff, int64_t K, int64_t kend, int64_t group_size, float* out,
                     int64_t ldo, const char* pf, bool vtail) {
  const __m256i lo_bytes = _mm256_setr_epi8(-1, -1, -1, 0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3,  //
                                            -1, -1, -1, 4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7);
  const __m256i hi_bytes = _mm256_setr_epi8(-1, -1, -1, 8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11,  //
                                            -1, -1, -1, 12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15);
  const __m256i top = _mm256_set1_epi32((int)0xF0000000u);
  const __m128i flip = _mm_set1_epi8((char)0x88);
  const int64_t G = K / group_size, ldw = K / 2;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    constexpr int C1 = kChains<NR, MT> - 1;  // index of the second chain (0: one chain)
    __m256 a[NR][MT][2];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) a[r][m][0] = a[r][m][1] = _mm256_setzero_ps();
    for (int64_t k = g * group_size; k < std::min((g + 1) * group_size, kend); k += 32) {
      if (pf) _mm_prefetch(pf + (k / 32) * kPrefetchStep, _MM_HINT_T0);
      for (int r = 0; r < NR; ++r) {
        __m128i bytes = _mm_loadu_si128((const __m128i*)(w + r * ldw + k / 2));
        if (FLIP) bytes = _mm_xor_si128(bytes, flip);
        const __m256i b = _mm256_broadcastsi128_si256(bytes);
        const __m256i v0 = _mm256_shuffle_epi8(b, lo_bytes), v1 = _mm256_shuffle_epi8(b, hi_bytes);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_slli_epi32(v0, 4));   // 2^28 x elements k, k+2, .., k+14
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, top));  // k+1, .., k+15
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_slli_epi32(v1, 4));   // k+16, .., k+30
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, top));  // k+17, .., k+31
        for (int m = 0; m < MT; ++m) {
          const float* xk = xp + m * K + k;
          a[r][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), a[r][m][0]);
          a[r][m][C1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), a[r][m][C1]);
          a[r][m][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xk + 16), a[r][m][0]);
          a[r][m][C1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xk + 24), a[r][m][C1]);
        }
      }
    }
    fold_group<NR, MT, C1>(total, a, scale, G, g);
  }
  prefetch_skipped_steps(pf, kend, K, 32, 1);
  return finish_int4_tile<NR, MT>(total, scale, zp, zoff, xsum, row_scale, G, out, ldo, vtail);
}

// int4, 64 k per step (K % 64 == 0, group_size % 64 == 0): one 32-byte load holds 64 nibbles as 8 uint32 lanes, and
// lane l's nibble j is element k0 + 8 l + j. For a fixed j, ONE AND with the mask 0xF << 4j leaves u_j * 2^(4j) in
// every lane (the top nibble: a logical shift right by 28, u_7 itself), and cvtdq2ps turns that into an exact float,
// so a nibble costs 1 decode + 1 convert + 1 FMA: 3 vector ops per 8 products against ~4 for w4_tile's
// broadcast/pshufb/shift decode (measured on one Zen 3 core, weights in L2: ~1.25x more products per second).
// x is prepared to match (int4_prepare_x_k64): x'[k0 + 8 j + l] = x[k0 + 8 l + j] * 2^-4j (j < 7; 2^0 for j = 7),
// so every product equals u * x. Codes are decoded unsigned (offset binary): signed codes are XOR'd with 0x88 to
// u = q + 8 first, and the zero-point correction subtracts (zero_point + zoff) * sum(x) per group (zoff = 8 signed,
// 0 unsigned). Loop order: j outside, weight rows inside, so each x vector is loaded once for NR rows.
template <int NR, int MT, bool XOR8>
QK_AVX2 bool w4m_tile(const float* xp, const float* xsum, const float* row_scale, const uint8_t* w, const float* scale,
                      const int32_t* zp, int32_t zoff, int64_t K, int64_t kend, int64_t group_size, float* out,
                      int64_t ldo, const char* pf, bool vtail) {
  const __m256i flip = _mm256_set1_epi8((char)0x88);
  const int64_t G = K / group_size, ldw = K / 2;
  constexpr int C1 = kChains<NR, MT> - 1;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 a[NR][MT][2];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) a[r][m][0] = a[r][m][1] = _mm256_setzero_ps();
    for (int64_t k = g * group_size; k < std::min((g + 1) * group_size, kend); k += 64) {
      if (pf) {  // a 4-row block consumes 4 x 32 bytes per step: two lines of the next block
        _mm_prefetch(pf + (k / 64) * 2 * kPrefetchStep, _MM_HINT_T0);
        _mm_prefetch(pf + (k / 64) * 2 * kPrefetchStep + kPrefetchStep, _MM_HINT_T0);
      }
      __m256i v[NR];
      for (int r = 0; r < NR; ++r) {
        v[r] = _mm256_loadu_si256((const __m256i*)(w + r * ldw + k / 2));
        if (XOR8) v[r] = _mm256_xor_si256(v[r], flip);
      }
      auto step = [&](auto j_tag) QK_AVX2 {
        constexpr int j = decltype(j_tag)::value;
        constexpr int c = (j & 1) ? C1 : 0;
        __m256 xv[MT];
        for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(xp + m * K + k + 8 * j);
        for (int r = 0; r < NR; ++r) {
          const __m256i u = j == 7 ? _mm256_srli_epi32(v[r], 28)
                                   : _mm256_and_si256(v[r], _mm256_set1_epi32(0xF << (4 * j)));
          const __m256 wv = _mm256_cvtepi32_ps(u);
          for (int m = 0; m < MT; ++m) a[r][m][c] = _mm256_fmadd_ps(wv, xv[m], a[r][m][c]);
        }
      };
      step(std::integral_constant<int, 0>());
      step(std::integral_constant<int, 1>());
      step(std::integral_constant<int, 2>());
      step(std::integral_constant<int, 3>());
      step(std::integral_constant<int, 4>());
      step(std::integral_constant<int, 5>());
      step(std::integral_constant<int, 6>());
      step(std::integral_constant<int, 7>());
    }
    fold_group<NR, MT, C1>(total, a, scale, G, g);
  }
  prefetch_skipped_steps(pf, kend, K, 64, 2);
  return finish_int4_tile<NR, MT>(total, scale, zp, zoff, xsum, row_scale, G, out, ldo, vtail);
}

// int4 x int16 activations (bf16/fp16 x only; prepare_x_i16 in cpu_dispatch.h): 64 k per step, integer dot
// products. One 32-byte load is 16 uint16 lanes of 4 nibbles each, lane l holding elements k0 + 4 l + j (j = 0..3,
// nibble j at bits 4j). For a fixed j, the decoded lanes times x_j[l] = xq[k0 + 4 l + j] (int16) is one vpmaddwd:
// 16 products summed in pairs into 8 int32 lanes. Decode: every nibble to u itself (j = 0 one AND, j = 1 and 2 a
// shift + AND, j = 3 one shift), so per 64 products and weight row: 6 decode ops + 4 vpmaddwd + 3 vpaddd into ONE
// int32 accumulator per output, against 8 x (AND + cvtdq2ps + FMA) for the fp32 w4m_tile. Bounds: |xq| <= 2^15 - 1
// and u <= 15, so one step adds at most 4 * 2 * 15 * 32767 < 2^22 to a lane; the fold unit F <= 256 k (4 steps)
// keeps every lane < 2^24. At the end of each F-block (x's scale unit, F divides group_size):
// total += float(A) * scale[g] * xs[b].
// Until 2026-12 the M = 1 tile (4x1) decoded j = 1, 2 as 16 u (one shift less) into a second accumulator per
// output, A + (B >> 4) at the fold: the same exact integer, so the same output bits, but 8 accumulators with x and
// the constants did not fit the 16 ymm registers and GCC kept half of them on the stack, a store-to-load round trip
// on every k step. Same-process A/B on the loaded 2-core machine: within noise (0.93-1.08x) at the decode shapes.
// Measured (2-core Zen 3, 4096 x 4096 g128, weights from DRAM, against the fp32 kernel on the same bf16 x): M = 1
// 627 vs 704 us, M = 4 1420 vs 1599, M = 16 5056 vs 5851, M = 24 7705 vs 9095.
template <int NR, int MT, bool XOR8>
QK_AVX2 bool w4i_tile(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* w, const float* scale,
                      const int32_t* zp, int32_t zoff, int64_t K, int64_t kend, int64_t group_size, int64_t F,
                      float* out, int64_t ldo, const char* pf, bool vtail) {
  const __m256i flip = _mm256_set1_epi8((char)0x88);
  const __m256i m0f = _mm256_set1_epi16(0x000F);
  const int64_t G = K / group_size, nB = K / F, ldw = K / 2;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nB; ++b) {
    __m256i A[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) A[r][m] = _mm256_setzero_si256();
    // k runs from 0 within the block: shifts instead of signed divisions in the addressing
    const uint8_t* wb = w + ((b * F) >> 1);
    const int16_t* xb = xq + b * F;
    const char* pfb = pf ? pf + ((b * F) >> 6) * 2 * kPrefetchStep : nullptr;
    const int64_t fend = std::min(F, kend - b * F);  // <= 0: a block of padding columns only
    for (int64_t k = 0; k < fend; k += 64) {
      if (pfb) {  // a 4-row block consumes 4 x 32 bytes per step: two lines of the next block
        _mm_prefetch(pfb + (k >> 6) * 2 * kPrefetchStep, _MM_HINT_T0);
        _mm_prefetch(pfb + (k >> 6) * 2 * kPrefetchStep + kPrefetchStep, _MM_HINT_T0);
      }
      for (int r = 0; r < NR; ++r) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(wb + r * ldw + (k >> 1)));
        if (XOR8) v = _mm256_xor_si256(v, flip);
        const __m256i d0 = _mm256_and_si256(v, m0f);
        const __m256i d1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
        const __m256i d2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m0f);
        const __m256i d3 = _mm256_srli_epi16(v, 12);
        for (int m = 0; m < MT; ++m) {
          const __m256i* xv = (const __m256i*)(xb + m * K + k);
          const __m256i p03 = _mm256_add_epi32(_mm256_madd_epi16(d0, _mm256_loadu_si256(xv)),
                                               _mm256_madd_epi16(d3, _mm256_loadu_si256(xv + 3)));
          const __m256i p12 = _mm256_add_epi32(_mm256_madd_epi16(d1, _mm256_loadu_si256(xv + 1)),
                                               _mm256_madd_epi16(d2, _mm256_loadu_si256(xv + 2)));
          A[r][m] = _mm256_add_epi32(A[r][m], _mm256_add_epi32(p03, p12));
        }
      }
    }
    const int64_t g = b * F / group_size;
    for (int r = 0; r < NR; ++r) {
      const float ws = scale[r * G + g];
      for (int m = 0; m < MT; ++m)
        total[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(A[r][m]), _mm256_set1_ps(ws * xs[m * nB + b]), total[r][m]);
    }
  }
  prefetch_skipped_steps(pf, kend, K, 64, 2);
  return finish_int4_tile<NR, MT>(total, scale, zp, zoff, xsum, nullptr, G, out, ldo, vtail);
}

// int4 x int8 activations (int8_dynamic_int4_mm, "W4A8"): 64 k per step, u8 x s8 dot products as llama.cpp's
// Q4_0 x Q8_0 dot does them. One 32-byte load holds 64 nibbles, byte i = elements 2i (low nibble) and 2i + 1 (high);
// x comes permuted to match (per 64-block: the 32 even elements, then the 32 odd ones; prepare_x_i8 in
// int_gemm.cpp). Per step and weight row: AND for the low nibbles, shift + AND for the high ones (u in [0, 15];
// signed codes XOR'd with 0x88 first: u = q + 8), two vpmaddubsw (u8 x s8, pairs summed to int16) and two int16
// adds: ~9 instructions per 64 products against ~16 for w4i_tile's int16 activations, whose vpmaddwd multiplies
// only 16 pairs per instruction. Bounds: |xq| <= 127 and u <= 15, so a vpmaddubsw lane is at most 2 * 15 * 127 =
// 3810 (no int16 saturation), a step adds at most 7620 to an int16 lane, and 4 steps (256 k) stay below 2^15: the
// int16 sums are widened (vpmaddwd by 1) and folded every 256 k and at each group end:
// total += float(S) * scale[g] * xs[m, g]. The zero-point term is subtracted at the end as in the other int4 tiles,
// with xsum[m, g] = xs[m, g] * sum of the group's codes.
template <int NR, int MT, bool XOR8>
QK_AVX2 bool w4q8_tile(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w, const float* scale,
                       const int32_t* zp, int32_t zoff, int64_t K, int64_t kend, int64_t group_size, float* out,
                       int64_t ldo, const char* pf, bool vtail) {
  const __m256i flip = _mm256_set1_epi8((char)0x88);
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t G = K / group_size, ldw = K / 2;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * group_size, gend = std::min(k0 + group_size, kend);  // <= k0: padding columns only
    float sx[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) sx[r][m] = scale[r * G + g] * xs[m * G + g];
    for (int64_t c = k0; c < gend; c += 256) {
      __m256i S[NR][MT];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MT; ++m) S[r][m] = _mm256_setzero_si256();
      const int64_t cend = std::min(c + 256, gend);
      for (int64_t k = c; k < cend; k += 64) {
        if (pf) {  // a 4-row block consumes 4 x 32 bytes per step: two lines of the next block
          _mm_prefetch(pf + (k >> 6) * 2 * kPrefetchStep, _MM_HINT_T0);
          _mm_prefetch(pf + (k >> 6) * 2 * kPrefetchStep + kPrefetchStep, _MM_HINT_T0);
        }
        __m256i xe[MT], xo[MT];
        for (int m = 0; m < MT; ++m) {
          xe[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + k));
          xo[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + k + 32));
        }
        for (int r = 0; r < NR; ++r) {
          __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * ldw + (k >> 1)));
          if (XOR8) v = _mm256_xor_si256(v, flip);
          const __m256i lo = _mm256_and_si256(v, m0f);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
          for (int m = 0; m < MT; ++m)
            S[r][m] = _mm256_add_epi16(S[r][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[m]),
                                                                 _mm256_maddubs_epi16(hi, xo[m])));
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MT; ++m)
          total[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(S[r][m], ones)),
                                        _mm256_set1_ps(sx[r][m]), total[r][m]);
    }
  }
  prefetch_skipped_steps(pf, kend, K, 64, 2);
  return finish_int4_tile<NR, MT>(total, scale, zp, zoff, xsum, nullptr, G, out, ldo, vtail);
}

// int8: pmovsxbd + cvtdq2ps per 8 weights (exact), the per-row scale applied to the fp32 sum.
template <int NR, int MT>
QK_AVX2 void w8_tile(const float* x, const int8_t* w, const float* scale, int64_t K, float* out, int64_t ldo,
                     const char* pf) {
  constexpr int C1 = kChains<NR, MT> - 1;
  __m256 a[NR][MT][2];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) a[r][m][0] = a[r][m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    // 16 k per step here, 32 in w4_tile: the same 64 prefetched bytes per step cover a 4-row block of K/16 steps
    if (pf) _mm_prefetch(pf + (k / 16) * kPrefetchStep, _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = w + r * K + k;
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
      for (int m = 0; m < MT; ++m) {
        const float* xk = x + m * K + k;
        a[r][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), a[r][m][0]);
        a[r][m][C1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), a[r][m][C1]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      out[m * ldo + r] = hsum(C1 ? _mm256_add_ps(a[r][m][0], a[r][m][1]) : a[r][m][0]) * scale[r];
}

// int8 x int16 activations (bf16/fp16 x; xq in natural order, x = xq * xs[m, k / F]): per 32 k and weight row,
// vpmovsxbw widens the 32 codes to two vectors of 16 int16 and vpmaddwd multiplies them with x, summing pairs into
// int32: 4 instructions per 32 products against 8 converts + 4 FMAs in w8_tile. Bounds: one step adds at most
// 2 * 2 * 128 * 32767 < 2^25 to a lane, F <= 256 (8 steps) keeps it < 2^28. At the end of each F-block
// total += float(acc) * xs[block]; the per-row scale multiplies the final sum.
template <int NR, int MT>
QK_AVX2 void w8i_tile(const int16_t* xq, const float* xs, const int8_t* w, const float* scale, int64_t K, int64_t F,
                      float* out, int64_t ldo, const char* pf) {
  const int64_t nB = K / F;
  __m256 total[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nB; ++b) {
    __m256i acc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_si256();
    for (int64_t k = b * F; k < (b + 1) * F; k += 32) {
      if (pf) {  // a 4-row block consumes 4 x 32 bytes per step: two lines of the next block
        _mm_prefetch(pf + (k / 32) * 2 * kPrefetchStep, _MM_HINT_T0);
        _mm_prefetch(pf + (k / 32) * 2 * kPrefetchStep + kPrefetchStep, _MM_HINT_T0);
      }
      for (int r = 0; r < NR; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
        for (int m = 0; m < MT; ++m) {
          const __m256i* xv = (const __m256i*)(xq + m * K + k);
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                                                   _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1))));
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 sx = _mm256_set1_ps(xs[m * nB + b]);
      for (int r = 0; r < NR; ++r) total[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m]), sx, total[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[m * ldo + r] = hsum(total[r][m]) * scale[r];
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

namespace {

// Rows [n0, n1) of the int4 GEMM through the 32-k (w4_tile) or the 64-k (w4m_tile) register kernel.
template <bool K64>
QK_AVX2 bool w4a16_rows(const float* xp, int64_t M, const float* xsum, const float* row_scale, const uint8_t* w,
                        const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                        int64_t group_size, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  // 32-k: signed codes decode to q itself, unsigned ones, XOR'd with 8, to u - 8 (the zero point moves by -8);
  // 64-k: codes decode unsigned, signed ones XOR'd with 8 to q + 8 (the zero point moves by +8)
  const int32_t zoff = K64 ? (is_signed ? 8 : 0) : (is_signed ? 0 : -8);
  const int64_t G = K / group_size, ldw = K / 2, d = pf_blocks();
  const bool vt = zp_vector_tail();
  bool bad = false;
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = int4_block_prefetch(w, scale, zero_point, n, ldw, G, pf_here, d);
    const int32_t* zp = zero_point ? zero_point + n * G : nullptr;
    float* o = out + m0 * ldo + n;
    const float* x = xp + m0 * K;
    const float* xs = xsum + m0 * G;
    const float* rs = row_scale + m0;
    const uint8_t* wn = w + n * ldw;
    const float* sn = scale + n * G;
    if constexpr (K64) {
      bad |= is_signed ? w4m_tile<NR, MT, true>(x, xs, rs, wn, sn, zp, zoff, K, kend, group_size, o, ldo, pf, vt)
                       : w4m_tile<NR, MT, false>(x, xs, rs, wn, sn, zp, zoff, K, kend, group_size, o, ldo, pf, vt);
    } else {
      bad |= is_signed ? w4_tile<NR, MT, false>(x, xs, rs, wn, sn, zp, zoff, K, kend, group_size, o, ldo, pf, vt)
                       : w4_tile<NR, MT, true>(x, xs, rs, wn, sn, zp, zoff, K, kend, group_size, o, ldo, pf, vt);
    }
  }, d);
  return bad;
}

}  // namespace

QK_AVX2 bool w4a16_rows_avx2(const float* xp, int64_t M, const float* xsum, const float* row_scale, const uint8_t* w,
                             const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                             int64_t group_size, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  return w4a16_rows<false>(xp, M, xsum, row_scale, w, scale, zero_point, is_signed, K, kend, group_size, out, ldo,
                           n0, n1);
}

QK_AVX2 bool w4a16_rows_avx2_k64(const float* xp, int64_t M, const float* xsum, const float* row_scale,
                                 const uint8_t* w, const float* scale, const int32_t* zero_point, bool is_signed,
                                 int64_t K, int64_t kend, int64_t group_size, float* out, int64_t ldo, int64_t n0,
                                 int64_t n1) {
  return w4a16_rows<true>(xp, M, xsum, row_scale, w, scale, zero_point, is_signed, K, kend, group_size, out, ldo, n0,
                          n1);
}

// Rows [n0, n1) of the int4 x int8 GEMM (w4q8_tile), in the tiles of for_tiles.
QK_AVX2 bool w4a8_rows_avx2(const int8_t* xq, int64_t M, const float* xs, const float* xsum, const uint8_t* w,
                            const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                            int64_t group_size, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int32_t zoff = is_signed ? 8 : 0;  // codes decode unsigned; signed ones XOR'd with 8 to q + 8
  const int64_t G = K / group_size, ldw = K / 2, d = pf_blocks();
  const bool vt = zp_vector_tail();
  bool bad = false;
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = int4_block_prefetch(w, scale, zero_point, n, ldw, G, pf_here, d);
    const int32_t* zp = zero_point ? zero_point + n * G : nullptr;
    const int8_t* x = xq + m0 * K;
    float* o = out + m0 * ldo + n;
    bad |= is_signed ? w4q8_tile<NR, MT, true>(x, xs + m0 * G, xsum + m0 * G, w + n * ldw, scale + n * G, zp, zoff,
                                               K, kend, group_size, o, ldo, pf, vt)
                     : w4q8_tile<NR, MT, false>(x, xs + m0 * G, xsum + m0 * G, w + n * ldw, scale + n * G, zp, zoff,
                                                K, kend, group_size, o, ldo, pf, vt);
  }, d);
  return bad;
}

// Rows [n0, n1) of the int4 x int16 GEMM (w4i_tile), in the tiles of for_tiles (4x1, 2x2, 2x4 and the 1xMT row
// tails), one int32 accumulator per output.
QK_AVX2 bool w4a16_rows_avx2_i16(const int16_t* xq, int64_t M, const float* xs, const float* xsum, const uint8_t* w,
                                 const float* scale, const int32_t* zero_point, bool is_signed, int64_t K,
                                 int64_t kend, int64_t group_size, int64_t F, float* out, int64_t ldo, int64_t n0,
                                 int64_t n1) {
  const int32_t zoff = is_signed ? 8 : 0;  // codes decode unsigned; signed ones XOR'd with 8 to q + 8
  const int64_t G = K / group_size, ldw = K / 2, nB = K / F, d = pf_blocks();
  const bool vt = zp_vector_tail();
  bool bad = false;
  auto tile = [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = int4_block_prefetch(w, scale, zero_point, n, ldw, G, pf_here, d);
    const int32_t* zp = zero_point ? zero_point + n * G : nullptr;
    const int16_t* x = xq + m0 * K;
    const float* xb = xs + m0 * nB;
    const float* xsm = xsum + m0 * G;
    float* o = out + m0 * ldo + n;
    bad |= is_signed ? w4i_tile<NR, MT, true>(x, xb, xsm, w + n * ldw, scale + n * G, zp, zoff, K, kend, group_size, F,
                                              o, ldo, pf, vt)
                     : w4i_tile<NR, MT, false>(x, xb, xsm, w + n * ldw, scale + n * G, zp, zoff, K, kend, group_size, F,
                                               o, ldo, pf, vt);
  };
  for_tiles(M, n0, n1, tile, d);
  return bad;
}

namespace {

// 8 elements of x as fp32, exactly (bf16: the top half of the fp32 bits; fp16: F16C), so the int16 activations
// are the same whether x arrives as 16-bit or already converted.
template <int KIND>
QK_AVX2 inline __m256 load8_as_f32(const void* p, int64_t i) {
  if constexpr (KIND == kXF32) {
    return _mm256_loadu_ps((const float*)p + i);
  } else if constexpr (KIND == kXBF16) {
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
  }
}

template <int KIND>
QK_AVX2 bool i16_quantize_rows(const void* x, int64_t ldx, int64_t kx, int64_t M, int64_t K, int64_t F,
                               int64_t group_size, bool permute, int16_t* xq, float* xs, float* xsum) {
  const int64_t G = K / group_size, nB = K / F;
  const __m256 sign = _mm256_set1_ps(-0.f);
  alignas(32) int32_t nat[256];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) xsum[m * G + g] = 0.f;
    for (int64_t b = 0; b < nB; ++b) {
      const int64_t blk = m * K + b * F, src = m * ldx + b * F;
      // columns from kx on are zeros (a ragged x, kx % 8 == 0): left out of the loads, zeros in xq
      const int64_t nv = std::max<int64_t>(0, std::min(F, kx - b * F));
      __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
      for (int64_t i = 0; i < nv; i += 8) {
        const __m256 v = load8_as_f32<KIND>(x, src + i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      const float a = hsum_max(amax);
      if (!_mm256_testz_ps(nan, nan) || !std::isfinite(a)) return false;
      const int e = a > 0.f ? std::ilogb(a) : 14;
      const __m256 up = _mm256_set1_ps(std::ldexp(1.f, 14 - e));
      __m256i isum = _mm256_setzero_si256();
      for (int64_t i = 0; i < nv; i += 8) {
        // |x| * 2^(14 - e) < 2^15: the rounded value (MXCSR default: nearest even) fits int16
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8_as_f32<KIND>(x, src + i), up));
        _mm256_store_si256((__m256i*)(nat + i), q);
        isum = _mm256_add_epi32(isum, q);
      }
      for (int64_t i = nv; i < F; ++i) nat[i] = 0;
      alignas(32) int32_t part[8];
      _mm256_store_si256((__m256i*)part, isum);
      int64_t total = 0;
      for (int i = 0; i < 8; ++i) total += part[i];
      xs[m * nB + b] = std::ldexp(1.f, e - 14);
      xsum[m * G + b * F / group_size] += (float)((double)total * std::ldexp(1.0, e - 14));
      int16_t* dst = xq + blk;
      if (permute) {
        for (int64_t c = 0; c < F; c += 64)
          for (int64_t j = 0; j < 4; ++j)
            for (int64_t l = 0; l < 16; ++l) dst[c + 16 * j + l] = (int16_t)nat[c + 4 * l + j];
      } else {
        for (int64_t i = 0; i < F; ++i) dst[i] = (int16_t)nat[i];
      }
    }
  }
  return true;
}

// 64 int32 codes in [-127, 127] (q[0..7], 8 consecutive elements each) -> dst[0..31] the 32 even elements,
// dst[32..63] the odd ones (w4q8_tile's order), or natural order (permute false). packs give bytes in
// lane-interleaved order, the permutevar restores natural order; pshufb then gathers evens / odds within each
// 128-bit lane, and two lane permutes join them.
QK_AVX2 inline void store_i8_block(const __m256i (&q)[8], int8_t* dst, bool permute) {
  const __m256i nat_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  __m256i half[2];
  for (int h = 0; h < 2; ++h) {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[4 * h], q[4 * h + 1]),
                                         _mm256_packs_epi32(q[4 * h + 2], q[4 * h + 3]));
    const __m256i nat = _mm256_permutevar8x32_epi32(b, nat_order);  // elements 32 h .. 32 h + 31 in order
    if (!permute) {
      _mm256_storeu_si256((__m256i*)(dst + 32 * h), nat);
      continue;
    }
    // per lane: 8 evens then 8 odds; then qwords (lane0 evens, lane1 evens, lane0 odds, lane1 odds)
    half[h] = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(nat, split), 0xD8);
  }
  if (!permute) return;
  _mm256_storeu_si256((__m256i*)dst, _mm256_permute2x128_si256(half[0], half[1], 0x20));
  _mm256_storeu_si256((__m256i*)(dst + 32), _mm256_permute2x128_si256(half[0], half[1], 0x31));
}

template <int KIND>
QK_AVX2 bool i8_quantize_rows(const void* x, int64_t kx, int64_t M, int64_t K, int64_t group_size, bool permute,
                              int8_t* xq, float* xs, float* xsum) {
  const int64_t G = K / group_size;
  const __m256 sign = _mm256_set1_ps(-0.f), lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m * kx;
    __m256 nan = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group_size, nv = std::max<int64_t>(0, std::min(group_size, kx - k0));
      __m256 amax = _mm256_setzero_ps();
      for (int64_t i = 0; i < nv; i += 8) {
        const __m256 v = load8_as_f32<KIND>(x, row + k0 + i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      const float a = hsum_max(amax);
      if (!_mm256_testz_ps(nan, nan) || !std::isfinite(a)) return false;
      float sc = a / 127.f;  // as quantize_x_per_group_i8 (int_gemm.cpp) computes it
      sc = sc > 0.f ? sc : 1.f;
      const __m256 vsc = _mm256_set1_ps(sc);
      __m256i isum = _mm256_setzero_si256();
      for (int64_t c = 0; c < group_size; c += 64) {
        __m256i q[8];
        for (int i = 0; i < 8; ++i) {
          const int64_t k = c + 8 * i;  // relative to k0; columns from nv on are zero codes
          if (k >= nv) {
            q[i] = _mm256_setzero_si256();
            continue;
          }
          // a true division and round-half-even, as the scalar loop and the reference do
          const __m256 r = _mm256_round_ps(_mm256_div_ps(load8_as_f32<KIND>(x, row + k0 + k), vsc),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, nlim), lim));
          isum = _mm256_add_epi32(isum, q[i]);
        }
        store_i8_block(q, xq + m * K + k0 + c, permute);
      }
      alignas(32) int32_t part[8];
      _mm256_store_si256((__m256i*)part, isum);
      int32_t total = 0;
      for (int i = 0; i < 8; ++i) total += part[i];
      xs[m * G + g] = sc;
      xsum[m * G + g] = sc * (float)total;
    }
  }
  return true;
}

}  // namespace

QK_AVX2 bool i8_quantize_rows_avx2(const void* x, int x_kind, int64_t kx, int64_t M, int64_t K, int64_t group_size,
                                   bool permute, int8_t* xq, float* xs, float* xsum) {
  if (x_kind == kXBF16) return i8_quantize_rows<kXBF16>(x, kx, M, K, group_size, permute, xq, xs, xsum);
  if (x_kind == kXF16) return i8_quantize_rows<kXF16>(x, kx, M, K, group_size, permute, xq, xs, xsum);
  return i8_quantize_rows<kXF32>(x, kx, M, K, group_size, permute, xq, xs, xsum);
}

QK_AVX2 bool i16_quantize_rows_avx2(const void* x, int x_kind, int64_t ldx, int64_t kx, int64_t M, int64_t K,
                                    int64_t F, int64_t group_size, bool permute, int16_t* xq, float* xs, float* xsum) {
  if (x_kind == kXBF16) return i16_quantize_rows<kXBF16>(x, ldx, kx, M, K, F, group_size, permute, xq, xs, xsum);
  if (x_kind == kXF16) return i16_quantize_rows<kXF16>(x, ldx, kx, M, K, F, group_size, permute, xq, xs, xsum);
  return i16_quantize_rows<kXF32>(x, ldx, kx, M, K, F, group_size, permute, xq, xs, xsum);
}

// The rounding of ATen's AVX2 conversions (vec256_16bit_float.h cvtfp32_bf16, vec256_half.h), so an output written
// here has the bits `out_fp32.to(dtype)` gives on this CPU: bf16 round-to-nearest-even with NaN -> 0xFFFF, fp16
// through vcvtps2ph (nearest even). The tail goes through the same vector code on a zero-padded copy.
QK_AVX2 void f32_to_half_avx2(const float* src, uint16_t* dst, int64_t n, bool bf16) {
  auto cvt8 = [&](__m256 v) QK_AVX2 -> __m128i {
    if (!bf16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), bits), 16);
    t = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
    t = _mm256_permute4x64_epi64(_mm256_packus_epi32(t, t), 0xd8);
    return _mm256_castsi256_si128(t);
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(dst + i), cvt8(_mm256_loadu_ps(src + i)));
  if (i < n) {
    alignas(32) float in[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    alignas(16) uint16_t out[8];
    for (int64_t j = i; j < n; ++j) in[j - i] = src[j];
    _mm_store_si128((__m128i*)out, cvt8(_mm256_load_ps(in)));
    for (int64_t j = i; j < n; ++j) dst[j] = out[j - i];
  }
}

QK_AVX2 void w8a16_rows_avx2(const float* x, int64_t M, const int8_t* w, const float* scale, int64_t K, float* out,
                             int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t d = pf_blocks();
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = pf_here ? (const char*)(w + (n + d * kRowBlock) * K) : nullptr;
    w8_tile<NR, MT>(x + m0 * K, w + n * K, scale + n, K, out + m0 * ldo + n, ldo, pf);
  }, d);
}

QK_AVX2 void w8a16_rows_avx2_i16(const int16_t* xq, int64_t M, const float* xs, const int8_t* w, const float* scale,
                                 int64_t K, int64_t F, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int64_t d = pf_blocks();
  for_tiles(M, n0, n1, [&](auto nr_tag, auto mt_tag, int64_t n, int64_t m0, bool pf_here) {
    constexpr int NR = decltype(nr_tag)::value, MT = decltype(mt_tag)::value;
    const char* pf = pf_here ? (const char*)(w + (n + d * kRowBlock) * K) : nullptr;
    w8i_tile<NR, MT>(xq + m0 * K, xs + m0 * (K / F), w + n * K, scale + n, K, F, out + m0 * ldo + n, ldo, pf);
  }, d);
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
bool w4a16_rows_avx2(const float*, int64_t, const float*, const float*, const uint8_t*, const float*, const int32_t*,
                     bool, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t) {
  return false;
}
bool w4a16_rows_avx2_k64(const float*, int64_t, const float*, const float*, const uint8_t*, const float*,
                         const int32_t*, bool, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t) {
  return false;
}
bool i16_quantize_rows_avx2(const void*, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int16_t*,
                            float*, float*) {
  return false;
}
void f32_to_half_avx2(const float*, uint16_t*, int64_t, bool) {}
bool i8_quantize_rows_avx2(const void*, int, int64_t, int64_t, int64_t, int64_t, bool, int8_t*, float*, float*) {
  return false;
}
bool w4a16_rows_avx2_i16(const int16_t*, int64_t, const float*, const float*, const uint8_t*, const float*,
                         const int32_t*, bool, int64_t, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                         int64_t) {
  return false;
}
bool w4a8_rows_avx2(const int8_t*, int64_t, const float*, const float*, const uint8_t*, const float*, const int32_t*,
                    bool, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t) {
  return false;
}
void w8a16_rows_avx2(const float*, int64_t, const int8_t*, const float*, int64_t, float*, int64_t, int64_t, int64_t) {}
void w8a16_rows_avx2_i16(const int16_t*, int64_t, const float*, const int8_t*, const float*, int64_t, int64_t, float*,
                         int64_t, int64_t, int64_t) {}
void i8i8_rows_avx2(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*, int64_t, int64_t, int64_t) {}
void w4_dequant_rows_avx2(const uint8_t*, const float*, const int8_t*, int64_t, int64_t, uint8_t, float*, int64_t,
                          int64_t) {}
void w8_dequant_rows_avx2(const int8_t*, const float*, int64_t, float*, int64_t, int64_t) {}
}  // namespace cpu
}  // namespace qkernels

#endif
