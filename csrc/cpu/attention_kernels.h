// Plain-pointer AVX2 kernels behind the CPU decode attention (attention_avx2.cpp; no torch types there, see
// int_gemm_avx2.cpp for why). attention.cpp calls them only where cpu_has_avx2_fma() (int_gemm_kernels.h) holds and
// QKERNELS_CPU_ISA does not force the portable loops. Semantics: qkernels/reference/attention.py.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qkernels {
namespace cpu {

// Element types of q / k / v / out and of the mask (fp64 takes the portable loops).
enum class AttnElem : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// One sequence's mask row m[0, L) -> its open positions idx[0, n) (ascending) and their mask values madd[0, n) in
// fp32; returns n. A position is closed where m <= lowest (its dtype's lowest finite value, or -inf); NaN stays open.
// idx and madd must hold L + 8 entries (whole 8-lane stores). Needs L < 2^31.
int64_t attention_open_positions_avx2(const void* m, AttnElem elem, int64_t L, float lowest, int32_t* idx,
                                      float* madd);

// Scratch floats decode_attention_kv_head_avx2 needs for G query heads, head_dim D and n open positions.
inline size_t decode_attention_scratch_floats(int64_t G, int64_t D, int64_t n) {
  return (size_t)G * (size_t)((D + 7) / 8 * 8) + (size_t)G * (size_t)((n + 7) / 8 * 8);
}

// One (sequence, kv head): out[g, :] = softmax_i(scale * q[g] . k[idx[i]] + madd[i]) @ v[idx[i]] for the G query
// heads g sharing this kv head, in fp32, cast to elem. q, out: [G, D] contiguous; k, v: this head's [L, D] block;
// idx: the n open positions (nullptr: 0..n-1); madd: their mask values (nullptr: none). Heads with no weight
// (n == 0, or every score -inf) get zeros; NaN scores give NaN rows. scratch: decode_attention_scratch_floats(G, D,
// n) floats (any alignment). next_k (nullptr: none): the [L, D] k block the next call reads with the same idx, whose
// open rows are prefetched while this head's v rows are summed (this head's v rows are prefetched while its scores
// are computed): a decode step's caches come from DRAM, evicted by the weights since the last step.
void decode_attention_kv_head_avx2(const void* q, const void* k, const void* v, AttnElem elem, int64_t G, int64_t D,
                                   const int32_t* idx, const float* madd, int64_t n, float scale, float* scratch,
                                   void* out, const void* next_k);

}  // namespace cpu
}  // namespace qkernels
