// Shared pieces of the AVX2 register-tiled CPU GEMMs (int_gemm_avx2.cpp, float_avx2.cpp): the horizontal sum, the
// prefetch helpers and the tile driver. Include only from files that include no torch header (see
// int_gemm_avx2.cpp for why) and only on x86-64; everything here is in an anonymous namespace, so each file gets
// its own AVX2 copy.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qkernels {
namespace cpu {
namespace {

QK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Register tiles of NR weight rows x MT activation rows: NR * MT outputs with C = 2 FMA chains each when that makes
// 8 accumulators (4x1, 2x2, 1x4 tails) and one chain for the 2x4 tile, so the 2 FMA pipes never wait on the 4-cycle
// FMA latency. Sharing each x load between NR weight rows, and each decoded weight vector between MT x rows, is what
// lifts these kernels off the decode/load limit of one weight row at a time (2026-11, one Zen 3 core, weights from
// DRAM: int4 ~9 -> ~13 G weights/s, int8 ~8 -> ~13 G weights/s at M = 1).
//
// Prefetch: the NR rows of a tile are read as NR interleaved streams, which the hardware prefetcher follows badly
// once weights come from DRAM (measured: NR=4 without prefetch was slower than one row at a time). So every k step
// also prefetches the next 64 bytes of the next 4-row block, which lies right after this one in memory: one
// linear stream, exactly one block ahead. `pf` is that block (nullptr for the last block of a thread's range).
constexpr int kRowBlock = 4;  // weight rows per block (NR * the number of NR-tiles per block)
constexpr int64_t kPrefetchStep = 64;

template <typename T>
QK_AVX2 inline void prefetch_rows(const T* p, int64_t count) {
  const char* c = (const char*)p;
  for (int64_t i = 0; i < count * (int64_t)sizeof(T); i += kPrefetchStep) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Rows [n0, n1) in blocks of kRowBlock weight rows; within a block, chunks of MT = 4, 2 or 1 x rows run as tiles of
// 2x4, 2x2 or 4x1 (NR x MT). `tile(nr_tag, mt_tag, row, m0, pf)` runs one tile; pf: the block pf_blocks blocks ahead
// (the one the tile prefetches) is a full one of this range.
template <typename Tile>
QK_AVX2 void for_tiles(int64_t M, int64_t n0, int64_t n1, const Tile& tile, int64_t pf_blocks = 1) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  for (int64_t n = n0; n < n1; n += kRowBlock) {
    const int64_t nb = n1 - n < kRowBlock ? n1 - n : kRowBlock;
    const bool pf = n + (pf_blocks + 1) * kRowBlock <= n1;
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0;
      const int mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
      const bool pf_here = pf && m0 == 0;  // the block is read once from memory, by the first chunk
      if (nb == kRowBlock) {
        if (mt == 1) {
          tile(I4(), I1(), n, m0, pf_here);
        } else if (mt == 2) {
          tile(I2(), I2(), n, m0, pf_here);
          tile(I2(), I2(), n + 2, m0, false);
        } else {
          tile(I2(), I4(), n, m0, pf_here);
          tile(I2(), I4(), n + 2, m0, false);
        }
      } else {
        for (int64_t r = 0; r < nb; ++r) {
          if (mt == 1) tile(I1(), I1(), n + r, m0, false);
          else if (mt == 2) tile(I1(), I2(), n + r, m0, false);
          else tile(I1(), I4(), n + r, m0, false);
        }
      }
      m0 += mt;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace qkernels
