// Which CPU kernels may run (the AVX2 ones of int_gemm_avx2.cpp / float_avx2.cpp, or the portable loops), and how
// the register kernels split weight rows among threads.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "float_kernels.h"
#include "int_gemm_kernels.h"

namespace qkernels {
namespace cpu {

// QKERNELS_CPU_ISA=scalar turns the AVX2 kernels off, so the portable paths (what non-x86 machines and CPUs without
// AVX2 run) can be tested on any machine. Read per call: tests flip it with monkeypatch.setenv.
inline bool use_avx2() {
  const char* e = std::getenv("QKERNELS_CPU_ISA");
  if (e != nullptr && *e != '\0' && std::strcmp(e, "auto") != 0) {
    TORCH_CHECK(std::strcmp(e, "scalar") == 0, "QKERNELS_CPU_ISA must be 'auto' or 'scalar', got '", e, "'");
    return false;
  }
  return cpu_has_avx2_fma();
}

// The element kind of T for the AVX2 float kernels (float_kernels.h); -1 for double, which they do not take.
template <typename T>
constexpr int float_kind() {
  return std::is_same<T, float>::value            ? (int)FloatKind::kF32
         : std::is_same<T, c10::BFloat16>::value ? (int)FloatKind::kBF16
         : std::is_same<T, c10::Half>::value     ? (int)FloatKind::kF16
                                                 : -1;
}

// The register kernels take rows in blocks of 4 (avx2_tiles.h kRowBlock).
constexpr int64_t kRowBlock = 4;

// For the register kernels: one contiguous range of rows per thread (at::parallel_for splits the range into equal
// chunks), so each thread streams its weights linearly and the kernel's prefetch of the next row block stays useful;
// the grain keeps small problems (< ~256K weights per thread) on fewer threads. f(n0, n1).
template <typename F>
void for_n_ranges(int64_t N, int64_t K, int64_t M, const F& f) {
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, kRowBlock * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    f(b0 * kRowBlock, std::min(N, b1 * kRowBlock));
  });
}

}  // namespace cpu
}  // namespace qkernels
