// Plain-pointer micro-kernels behind the CPU integer GEMMs (no torch types: see int_gemm_avx2.cpp for why).
#pragma once
#include <cstdint>

namespace qkernels {
namespace cpu {

bool cpu_has_avx2_fma();

// out[m, n] = row_scale[m] * sum_g scale[n, g] * sum_{k in g} (q[n, k] - zero_point[n, g]) * x'[m, k] for n in
// [n0, n1), all m < M: the int4 GEMM with x = row_scale[m] * x'. xp: fp32 [M, K], x' * 2^-28 with each 16-element
// block permuted to (8 evens, 8 odds) to match the nibble order; xsum: fp32 [M, K/g], the sums of x' over each
// quantization group; row_scale: fp32 [M] (powers of two; see int4_prepare_x in int_gemm.cpp). w: [N, K/2] packed
// nibbles, signed (is_signed) or unsigned codes q; zero_point: int32 [N, K/g] or nullptr (0). Needs K % 32 == 0 and
// group_size % 32 == 0. Returns true when a zero point lies outside [-8, 16] (the caller raises).
// kend <= K: the columns of x from kend on are zero (a ragged x padded to the weight's K): the kernels skip their
// k steps; kend is a multiple of the kernel's step (32 here, 64 for the two below).
bool w4a16_rows_avx2(const float* xp, int64_t M, const float* xsum, const float* row_scale, const uint8_t* w,
                     const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                     int64_t group_size, float* out, int64_t ldo, int64_t n0, int64_t n1);

// The same GEMM with the 64-k mask decode (faster; needs K % 64 == 0 and group_size % 64 == 0): xp laid out by
// int4_prepare_x_k64 (per 64-block, x'[8 j + l] = x[8 l + j] * 2^-4j for j < 7, * 1 for j = 7, all times the row's
// 2^-E), xsum and row_scale as above.
bool w4a16_rows_avx2_k64(const float* xp, int64_t M, const float* xsum, const float* row_scale, const uint8_t* w,
                         const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                         int64_t group_size, float* out, int64_t ldo, int64_t n0, int64_t n1);

// The same GEMM on int16 activations (integer dot products; K % 64 == 0, group_size % 64 == 0): xq int16 [M, K] in
// the layout of prepare_x_i16 in int_gemm.cpp (per 64-block, xq[16 j + l] = x[4 l + j]), x = xq * xs[m, k / F]
// (F divides group_size, F <= 256), xsum the per-group sums of that x.
bool w4a16_rows_avx2_i16(const int16_t* xq, int64_t M, const float* xs, const float* xsum, const uint8_t* w,
                         const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                         int64_t group_size, int64_t F, float* out, int64_t ldo, int64_t n0, int64_t n1);

// The same GEMM on int8 activations (int8_dynamic_int4_mm; K % 64 == 0, group_size % 64 == 0): xq int8 [M, K] in
// [-127, 127], per 64-block the 32 even elements then the 32 odd ones; x = xq * xs[m, g] (one scale per row and
// weight group); xsum[m, g] = xs[m, g] * the sum of the group's codes.
bool w4a8_rows_avx2(const int8_t* xq, int64_t M, const float* xs, const float* xsum, const uint8_t* w,
                    const float* scale, const int32_t* zero_point, bool is_signed, int64_t K, int64_t kend,
                    int64_t group_size, float* out, int64_t ldo, int64_t n0, int64_t n1);

// The element type of x handed to i16_quantize_rows_avx2.
enum XKind : int { kXF32 = 0, kXBF16 = 1, kXF16 = 2 };

// x [M, kx] (row stride ldx), fp32 / bf16 / fp16 (x_kind), as [M, K] with columns kx..K-1 zero (kx % 8 == 0;
// kx = ldx = K for an unpadded x) -> the int16 activations of w4a16_rows_avx2_i16 (see
// prepare_x_i16 in cpu_dispatch.h): xq, xs [M, K/F], xsum [M, K/group_size]; 16-bit x is widened exactly in
// registers, so the result is the same as for x converted to fp32 first. Returns false when x holds NaN or inf
// (nothing usable is written then). permute: the int4 kernel's order (per 64-block xq[16 j + l] = x[4 l + j]);
// otherwise natural order (int8 kernel).
bool i16_quantize_rows_avx2(const void* x, int x_kind, int64_t ldx, int64_t kx, int64_t M, int64_t K, int64_t F,
                            int64_t group_size, bool permute, int16_t* xq, float* xs, float* xsum);

// x [M, kx] contiguous, fp32 / bf16 / fp16 (x_kind), as [M, K] with columns kx..K-1 zero (kx % 8 == 0,
// group_size % 64 == 0) -> the int8 activations of w4a8_rows_avx2: per row and group xs = amax / 127 (1 for an
// all-zero group), codes round_half_even(x / xs) clamped to [-127, 127] (the bits quantize_x_per_group_i8 in
// int_gemm.cpp and the reference give), per 64-block the 32 even elements then the 32 odd ones (permute) or natural
// order; xsum = xs * the group's code sum. Returns false when x holds NaN or inf (nothing usable is written then).
bool i8_quantize_rows_avx2(const void* x, int x_kind, int64_t kx, int64_t M, int64_t K, int64_t group_size,
                           bool permute, int8_t* xq, float* xs, float* xsum);

// dst[i] = src[i] as bf16 (bf16 = true) or fp16 bits, n elements, rounded as ATen's AVX2 conversion rounds (the
// bits of `.to(dtype)` on AVX2 CPUs, NaN included: bf16 0xFFFF, fp16 vcvtps2ph).
void f32_to_half_avx2(const float* src, uint16_t* dst, int64_t n, bool bf16);

// out[m, n] = scale[n] * sum_k w[n, k] * x[m, k]; x fp32 [M, K]; needs K % 16 == 0.
void w8a16_rows_avx2(const float* x, int64_t M, const int8_t* w, const float* scale, int64_t K, float* out,
                     int64_t ldo, int64_t n0, int64_t n1);

// The same on int16 activations (bf16/fp16 x; K % 64 == 0): xq int16 [M, K] natural order with x = xq * xs[m, k / F]
// (i16_quantize_rows_avx2 with permute = false; F divides K, F <= 256).
void w8a16_rows_avx2_i16(const int16_t* xq, int64_t M, const float* xs, const int8_t* w, const float* scale,
                         int64_t K, int64_t F, float* out, int64_t ldo, int64_t n0, int64_t n1);

// out[m, n] = sum_k xq[m, k] * w[n, k] exactly in int32; xq in [-127, 127]; needs K % 32 == 0.
void i8i8_rows_avx2(const int8_t* xq, int64_t M, int64_t ldx, const int8_t* w, int64_t K, int32_t* out, int64_t ldo,
                    int64_t n0, int64_t n1);

// dst[n - n0, k] = scale[n, g] * (u(w[n, k]) - zz[n, g]) as fp32 rows in natural k order; u = the nibble XOR'd with
// xor_mask (0x88 for signed codes: u = q + 8); zz: int8 [N, K/g] effective zero point (zero_point + 8 for signed
// codes). K % 32 == 0 and group_size % 32 == 0.
void w4_dequant_rows_avx2(const uint8_t* w, const float* scale, const int8_t* zz, int64_t K, int64_t group_size,
                          uint8_t xor_mask, float* dst, int64_t n0, int64_t n1);

// dst[n - n0, k] = scale[n] * w[n, k]; K % 16 == 0.
void w8_dequant_rows_avx2(const int8_t* w, const float* scale, int64_t K, float* dst, int64_t n0, int64_t n1);

}  // namespace cpu
}  // namespace qkernels
