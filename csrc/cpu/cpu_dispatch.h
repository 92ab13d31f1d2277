// Which CPU kernels may run (the AVX2 ones of int_gemm_avx2.cpp / float_avx2.cpp, or the portable loops), and how
// the register kernels split weight rows among threads, and the int16 activations of the bf16/fp16 kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/MaybeOwned.h>

#include <algorithm>
#include <cstddef>
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
// One thread, or work within one grain: called directly (at::parallel_for's own checks and, with one OpenMP
// thread, its parallel region cost ~0.5 us per call, a visible share of a decode-sized GEMM).
template <typename F>
void for_n_ranges(int64_t N, int64_t K, int64_t M, const F& f) {
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, kRowBlock * K * M));
  if (blocks <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    if (N > 0) f(0, N);
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    f(b0 * kRowBlock, std::min(N, b1 * kRowBlock));
  });
}

// bf16/fp16 x [M, K] -> the int16 activations of the *_rows_avx2_i16 kernels: per F-block of a row (F = 256, 128 or
// 64, the largest that divides group_size; per-channel int8: K), x = xq * 2^(e - 14) with e the binary exponent of
// the block's largest |x|, so |xq| < 2^15 and xq = round-to-nearest-even(x * 2^(14 - e)). For bf16 (8 significant
// bits) every element within 2^-7 of the block's max is exact, fp16 (11 bits) within 2^-4; smaller ones are rounded
// to 2^-15 of the block max, far below the rounding of the 16-bit output. permute: each 64-block in the int4
// kernel's nibble order, xq[16 j + l] = q(x[4 l + j]) (else natural order, for int8); xsum = per-group sums of
// xq * scale (exact int sums, scaled), for the int4 zero-point correction. Returns false (nothing
// usable) when a row holds NaN or inf: the fp32 kernels handle those, propagating them like the reference.
inline int64_t i16_block(int64_t group_size) {
  return group_size % 256 == 0 ? 256 : group_size % 128 == 0 ? 128 : 64;
}

inline bool prepare_x_i16(const at::Tensor& x, int64_t group_size, bool permute, at::Tensor& xq, at::Tensor& xs,
                   at::Tensor& xsum) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size, F = i16_block(group_size);
  auto xf = x.to(at::kFloat).contiguous();  // exact for bf16/fp16, and ATen's conversion is vectorised
  xq = at::empty({M, K}, x.options().dtype(at::kShort));
  xs = at::empty({M, K / F}, x.options().dtype(at::kFloat));
  xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
  return i16_quantize_rows_avx2(xf.data_ptr<float>(), kXF32, K, K, M, K, F, group_size, permute,
                                xq.data_ptr<int16_t>(), xs.data_ptr<float>(), xsum.data_ptr<float>());
}

// Per-thread, grow-only scratch buffers (64-byte aligned; contents undefined): what the GEMM wrappers used to
// at::empty on every call (the int16 activations, their scales and group sums, the fp32 output of a 16-bit call).
// At decode sizes those allocations and tensor constructions were a large share of the ~8 us fixed cost of a
// call. Only the calling thread writes them before a kernel runs; the kernel's worker threads read them while
// the caller waits in parallel_for. The memory stays with the thread (the largest M x N output it produced, e.g.
// 192 KiB for a 49152-wide output head at M = 1).
enum ScratchSlot : int { kScratchXq, kScratchXs, kScratchXsum, kScratchOut, kScratchSlots };

template <typename T>
T* thread_scratch(ScratchSlot slot, int64_t count) {
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[kScratchSlots];
  Buf& b = bufs[slot];
  const size_t bytes = (size_t)std::max<int64_t>(count, 1) * sizeof(T);
  if (b.n < bytes) {
    const size_t n = (std::max(bytes, 2 * b.n) + 63) & ~(size_t)63;  // doubling: few regrowths as shapes vary
    void* p = std::aligned_alloc(64, n);
    TORCH_CHECK(p != nullptr, "qkernels: could not allocate ", n, " bytes of CPU GEMM scratch");
    std::free(b.p);
    b.p = p;
    b.n = n;
  }
  return static_cast<T*>(b.p);
}

// The int16 activations of a 16-bit (or guard-rescaled fp32) x in the calling thread's scratch; see prepare_x_i16.
// K: the weight's columns, >= x.size(1) (a ragged x, x.size(1) % 8 == 0: its missing columns are zeros in xq).
struct XI16 {
  const int16_t* xq;
  const float* xs;
  const float* xsum;
};
inline bool prepare_x_i16_scratch(const at::Tensor& x, int64_t K, int64_t group_size, bool permute, XI16& out) {
  const int64_t M = x.size(0), Kx = x.size(1), G = K / group_size, F = i16_block(group_size);
  const int kind = x.scalar_type() == at::kBFloat16 ? kXBF16 : x.scalar_type() == at::kHalf ? kXF16 : kXF32;
  TORCH_CHECK(kind != kXF32 || x.scalar_type() == at::kFloat, "prepare_x_i16: x must be fp32, bf16 or fp16, got ",
              x.scalar_type());
  const c10::MaybeOwned<at::Tensor> xc = x.expect_contiguous();
  int16_t* xq = thread_scratch<int16_t>(kScratchXq, M * K);
  float* xs = thread_scratch<float>(kScratchXs, M * (K / F));
  float* xsum = thread_scratch<float>(kScratchXsum, M * G);
  out = {xq, xs, xsum};
  return i16_quantize_rows_avx2(xc->data_ptr(), kind, Kx, Kx, M, K, F, group_size, permute, xq, xs, xsum);
}

// QKERNELS_CPU_I16: whether bf16/fp16 calls of the int4 and int8 weight-only GEMMs take the int16-activation
// kernels. "auto" / "1" (default): yes, wherever the register kernels run (faster at every M up to the threshold;
// docs/cpu_gemm.md has the numbers); "0": no (tests of the fp32 kernels on 16-bit x, benchmark A/B). Read per call.
inline bool use_i16(const at::Tensor& x) {
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) return false;
  const char* e = std::getenv("QKERNELS_CPU_I16");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return true;
  TORCH_CHECK(std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0,
              "QKERNELS_CPU_I16 must be 'auto', '0' or '1', got '", e, "'");
  return *e == '1';
}

}  // namespace cpu
}  // namespace qkernels
