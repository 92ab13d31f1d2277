// The seam between the torch-facing host code (csrc/cuda/*.cpp: argument checks, allocation, op registration) and
// the CUDA kernels (csrc/cuda/*.cu). The .cu files see only this header, CUDA's own headers and the QK_HD math of
// csrc/include/qkernels: nvcc compiles every .cu once per target arch plus once for the host, and parsing the
// torch/ATen headers in each of those passes would dominate the build (3 archs in CI).
//
// All pointers are device pointers to contiguous data; launchers only enqueue work on `stream` (callers check launch
// errors with C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qkernels {
namespace cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

// ---- int_quant.cu ----
// scale/zero point per group of `group_size` consecutive elements; *nonfinite set to 1 if a group has NaN/inf.
void launch_choose_qparams(DType wt, const void* w, int64_t ngroups, int64_t group_size, int bits, bool symmetric,
                           bool is_signed, bool float_zp, float* scale, int32_t* zp_int, float* zp_float,
                           int* nonfinite, cudaStream_t stream);
// q (int8 if is_signed else uint8) of n elements; zp_int may be null (0); zp_float used iff float_zp.
void launch_quantize(DType wt, const void* w, const float* scale, const int32_t* zp_int, const float* zp_float,
                     int64_t n, int64_t group_size, int bits, bool is_signed, bool float_zp, void* q,
                     cudaStream_t stream);
void launch_dequantize(bool q_signed, const void* q, const float* scale, const int32_t* zp_int, const float* zp_float,
                       int64_t n, int64_t group_size, bool float_zp, DType out_t, void* out, cudaStream_t stream);
// n_out packed bytes from 2 * n_out codes; *bad set to 1 if a code is outside the int4 range.
void launch_pack_int4(const uint8_t* in, bool is_signed, int64_t n_out, uint8_t* out, int* bad, cudaStream_t stream);
void launch_unpack_int4(const uint8_t* in, bool is_signed, int64_t n_in, uint8_t* out, cudaStream_t stream);

// ---- int_gemm.cu ----
// Rows of x per mma tile and the largest M the decode kernel takes (beyond it: dequantize + cuBLAS).
constexpr int64_t kMmaMaxM = 64;
// out_acc[M, N] (fp32, zeroed by the caller) += x[M, K] @ W^T with the tensor-core decode kernel. x fp16/bf16;
// w4: packed int4 [N, K/2] with scale/zp [N, K/group_size] (zp may be null); else int8 [N, K] with scale [N].
// Needs K % 32 == 0, group_size % 32 == 0 (w4), 16-byte aligned x and w, sm80+.
void launch_weight_only_mma(DType xt, bool w4, const void* x, const uint8_t* w, const float* scale, const int32_t* zp,
                            bool is_signed, int64_t M, int64_t N, int64_t K, int64_t group_size, int num_sms,
                            float* out_acc, cudaStream_t stream);
// The same product in ONE launch, written straight to out [M, N] in x's dtype (no split-K, no workspace): the
// "direct" decode kernel. Same requirements; weight_only_mma_direct_fills says whether its grid (parallel over N
// only) gives every SM a block.
bool weight_only_mma_direct_fills(int64_t M, int64_t N, int num_sms);
void launch_weight_only_mma_direct(DType xt, bool w4, const void* x, const uint8_t* w, const float* scale,
                                   const int32_t* zp, bool is_signed, int64_t M, int64_t N, int64_t K,
                                   int64_t group_size, void* out, cudaStream_t stream);
// W4 -> out [N, K] in out_t (fp32/fp16/bf16): scale * (q - zero_point), any group_size dividing K.
void launch_dequant_int4(DType out_t, const uint8_t* w, const float* scale, const int32_t* zp, bool is_signed,
                         int64_t N, int64_t K, int64_t group_size, void* out, cudaStream_t stream);

// ---- int_quant.cu: W8A8 activation quantization ----
// Symmetric per-row int8 of x [M, K] (quantize_per_token_int8): q int8 [M, K], scale fp32 [M] (NaN and zero codes
// for a row with NaN/inf).
void launch_quantize_per_token_int8(DType xt, const void* x, int64_t M, int64_t K, int8_t* q, float* scale,
                                    cudaStream_t stream);

// ---- float_cast.cu: fp8 / fp4 casts (qkernels/float8.h, float4.h) ----
// Matrices are [R, C] row-major, cut into blocks of br x bc elements; a block scale grid is [R / br, C / bc].
// Max of the finite |x| per block as fp32 bits, atomically folded into amax_bits (zeroed by the caller).
void launch_block_amax(DType xt, const void* x, int64_t R, int64_t C, int64_t br, int64_t bc, int32_t* amax_bits,
                       cudaStream_t stream);
// In place, n values: fp32 amax (as bits) -> fp8 scale amax / fmax (1 where 0), or with nv_elem_format >= 0 the
// NVFP4 per-tensor scale nv_global_scale(amax) of that element format.
void launch_scale_from_amax(float* amax_in_scale_out, int64_t n, int fp8_format, int nv_elem_format,
                            cudaStream_t stream);
// q[r, c] = fp8(x[r, c] / scale[r / br, c / bc]) of format `fp8_format` (float8.h MiniFloatId).
void launch_quantize_fp8(DType xt, const void* x, const float* scale, int64_t R, int64_t C, int64_t br, int64_t bc,
                         int fp8_format, bool saturate, uint8_t* q, cudaStream_t stream);
// out[r, c] = float(q[r, c]) * scale[r / br, c / bc] in out_t.
void launch_dequantize_fp8(const uint8_t* q, const float* scale, int64_t R, int64_t C, int64_t br, int64_t bc,
                           int fp8_format, DType out_t, void* out, cudaStream_t stream);
// fp4 elements, two per byte (element 2i in the low nibble): n_bytes bytes from / to 2 * n_bytes values.
void launch_fp4_encode(DType xt, const void* x, int64_t n_bytes, int elem_format, uint8_t* packed,
                       cudaStream_t stream);
void launch_fp4_decode(const uint8_t* packed, int64_t n_bytes, int elem_format, DType out_t, void* out,
                       cudaStream_t stream);
// MXFP4 (nv=false, blocks of 32, e8m0 scales) / NVFP4 (nv=true, blocks of 16, e4m3 scales times *global_scale) of
// x [R, K]: packed [R, K / 2], scale codes [R, K / B]; global_scale is a device pointer (ignored for MX).
void launch_quantize_fp4(DType xt, const void* x, int64_t R, int64_t K, bool nv, int elem_format,
                         const float* global_scale, uint8_t* packed, uint8_t* scale, cudaStream_t stream);
void launch_dequantize_fp4(const uint8_t* packed, const uint8_t* scale, const float* global_scale, int64_t R,
                           int64_t K, bool nv, int elem_format, DType out_t, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace qkernels
