// Largest |x| over a run of floats, as integer max reductions over the fp32 bit patterns: non-negative floats order
// like their bits, so these vectorize without -ffast-math (a float max reduction does not). Shared by the fp8 / fp4
// casts (block and tensor amax) and the GEMMs' row guard (row_guard.h).
#pragma once
#include <algorithm>
#include <cstdint>

#include "qkernels/float8.h"  // f32_bits, bits_f32

namespace qkernels {
namespace cpu {

constexpr int32_t kInfBits = 0x7F800000;

// max of the finite |src[i]| (NaN and inf ignored); 0 for n == 0.
template <typename T>
float finite_amax(const T* src, int64_t n) {
  int32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t a = (int32_t)(f32_bits(static_cast<float>(src[i])) & 0x7FFFFFFFu);
    m = std::max(m, a < kInfBits ? a : 0);
  }
  return bits_f32((uint32_t)m);
}

// The bits of the max finite |src[i]|, or -1 when the run holds a NaN or an inf.
template <typename T>
int32_t finite_amax_bits_or_neg(const T* src, int64_t n) {
  int32_t m = 0, bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t a = (int32_t)(f32_bits(static_cast<float>(src[i])) & 0x7FFFFFFFu);
    bad |= a >= kInfBits;
    m = std::max(m, a < kInfBits ? a : 0);
  }
  return bad ? -1 : m;
}

// Both at once: `finite` the bits of the max finite |src[i]|, `all` the bits of the max |src[i]| over everything
// (all > kInfBits: the run holds a NaN; all == kInfBits: an inf and no NaN).
struct AbsBitsMax {
  int32_t finite, all;
};
template <typename T>
AbsBitsMax abs_bits_max(const T* src, int64_t n) {
  int32_t m = 0, mall = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t a = (int32_t)(f32_bits(static_cast<float>(src[i])) & 0x7FFFFFFFu);
    mall = std::max(mall, a);
    m = std::max(m, a < kInfBits ? a : 0);
  }
  return {m, mall};
}

}  // namespace cpu
}  // namespace qkernels
