// CUDA entry points for the integer GEMMs W4A16 / W8A16 (dequant) and W8A8 (int8 x int8 on cuBLAS): argument checks
// (mirroring csrc/cpu/int_gemm.cpp), the choice between the tensor-core decode kernel and dequantize + cuBLAS (see
// int_gemm.cu), the capability switch, device guard, current stream, launch checks and TORCH_LIBRARY_IMPL.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "capability.h"
#include "launchers.h"
#include "qkernels/check.h"
#include "qkernels/int_checks.h"

namespace qkernels {

namespace cuda {
DType to_dtype(at::ScalarType t);  // int_quant_ops.cpp
}  // namespace cuda

// int_quant_ops.cpp: reused by the W8A16 large-M path
at::Tensor dequantize_affine_cuda(const at::Tensor& q, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, int64_t group_size,
                                  bool float_zero_point, at::ScalarType out_dtype);

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

using cuda::check_capability;
using cuda::device_attribute;

bool decode_path(const at::Tensor& xc, const at::Tensor& wc, int64_t K, int64_t group_size) {
  const bool half_x = xc.scalar_type() == at::kHalf || xc.scalar_type() == at::kBFloat16;
  return half_x && xc.size(0) <= cuda::kMmaMaxM && K % 32 == 0 && group_size % 32 == 0 &&
         aligned16(xc.data_ptr()) && aligned16(wc.data_ptr());
}

// QKERNELS_CUDA_DECODE = auto (default) | direct | splitk: which tensor-core decode kernel runs (int_gemm.cu).
// auto: the one-launch direct kernel when its grid gives every SM a block, else split-K. Read per call, so tests
// run both kernels on the same shapes and benchmarks compare them in one process.
bool use_direct_decode(int64_t M, int64_t N) {
  const char* e = std::getenv("QKERNELS_CUDA_DECODE");
  if (e != nullptr && *e != '\0' && std::strcmp(e, "auto") != 0) {
    TORCH_CHECK(std::strcmp(e, "direct") == 0 || std::strcmp(e, "splitk") == 0,
                "QKERNELS_CUDA_DECODE must be 'auto', 'direct' or 'splitk', got '", e, "'");
    return std::strcmp(e, "direct") == 0;
  }
  return cuda::weight_only_mma_direct_fills(M, N, device_attribute(cudaDevAttrMultiProcessorCount));
}

at::Tensor run_mma(const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& sc, const int32_t* zp, bool w4,
                   bool is_signed, int64_t N, int64_t K, int64_t group_size) {
  const int64_t M = xc.size(0);
  // N < 2^35 keeps the direct kernel's grid ((N + 15) / 16 blocks) under the 2^31 - 1 limit
  TORCH_CHECK(N < (1LL << 35) && M <= cuda::kMmaMaxM, "int GEMM too large for the decode kernel: N=", N, ", M=", M);
  if (use_direct_decode(M, N)) {
    auto out = at::empty({M, N}, xc.options());
    cuda::launch_weight_only_mma_direct(cuda::to_dtype(xc.scalar_type()), w4, xc.data_ptr(),
                                        static_cast<const uint8_t*>(wc.data_ptr()), sc.data_ptr<float>(), zp,
                                        is_signed, M, N, K, group_size, out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  auto acc = at::zeros({M, N}, xc.options().dtype(at::kFloat));
  cuda::launch_weight_only_mma(cuda::to_dtype(xc.scalar_type()), w4, xc.data_ptr(),
                               static_cast<const uint8_t*>(wc.data_ptr()), sc.data_ptr<float>(), zp, is_signed, M, N,
                               K, group_size, device_attribute(cudaDevAttrMultiProcessorCount), acc.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return acc.to(xc.scalar_type());
}

at::Tensor int4_weight_only_mm_cuda(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& zero_point, int64_t group_size, bool is_signed) {
  check_int4_mm_args(x, packed_w, scale, zero_point, group_size);
  // no zero-point range check here (it would cost a device sync per call): the decode is exact for any int32 zero
  // point with |q - zero_point| < 2^22, far beyond int4's [-8, 16] that the public API documents
  const int64_t M = x.size(0), K = x.size(1), N = packed_w.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  check_capability("int4_weight_only_mm");
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0) return at::zeros({M, N}, x.options());
  auto xc = x.contiguous();
  auto wc = packed_w.contiguous();
  auto sc = scale.to(at::kFloat).contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  const int32_t* zp = zc.defined() ? zc.data_ptr<int32_t>() : nullptr;
  if (decode_path(xc, wc, K, group_size)) return run_mma(xc, wc, sc, zp, true, is_signed, N, K, group_size);
  // large M / fp32 x / odd shapes: dequantize into x's dtype, then cuBLAS
  auto wd = at::empty({N, K}, x.options());
  cuda::launch_dequant_int4(cuda::to_dtype(x.scalar_type()), wc.data_ptr<uint8_t>(), sc.data_ptr<float>(), zp,
                            is_signed, N, K, group_size, wd.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return at::mm(xc, wd.t());
}

at::Tensor int8_weight_only_mm_cuda(const at::Tensor& x, const at::Tensor& q_w, const at::Tensor& scale) {
  check_int8_mm_args(x, q_w, scale, "scale");
  const int64_t M = x.size(0), K = x.size(1), N = q_w.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  check_capability("int8_weight_only_mm");
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0) return at::zeros({M, N}, x.options());
  auto xc = x.contiguous();
  auto wc = q_w.contiguous();
  auto sc = scale.to(at::kFloat).contiguous();
  // group_size 32 stands for "no group constraint": the int8 scale is per row, applied in the epilogue
  if (decode_path(xc, wc, K, 32)) return run_mma(xc, wc, sc, nullptr, false, true, N, K, K);
  // per-channel int8 is dequantize_affine with one group per row
  auto wd = dequantize_affine_cuda(wc, sc.unsqueeze(1), std::nullopt, K, false, x.scalar_type());
  return at::mm(xc, wd.t());
}


// Rows with NaN/inf get scale NaN and codes 0, as on CPU.
std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cuda(const at::Tensor& x) {
  check_x_2d(x);
  const int64_t M = x.size(0), K = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  auto xc = x.contiguous();
  cuda::launch_quantize_per_token_int8(cuda::to_dtype(x.scalar_type()), xc.data_ptr(), M, K, q.data_ptr<int8_t>(),
                                       scale.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale};
}

// W8A8: the per-token quantize kernel, then cuBLAS int8 x int8 -> int32 (torch._int_mm, exact), then the fp32
// epilogue acc * x_scale[m] * w_scale[n] in the CPU kernel's order. _int_mm wants more than 16 rows and K, N
// multiples of 8: operands are zero-padded up to that (zero rows/columns add nothing to the exact int32 sums).
at::Tensor int8_dynamic_mm_cuda(const at::Tensor& x, const at::Tensor& q_w, const at::Tensor& w_scale) {
  check_int8_mm_args(x, q_w, w_scale, "w_scale");
  const int64_t M = x.size(0), K = x.size(1), N = q_w.size(0);
  TORCH_CHECK(K < (1 << 17), "K=", K, " is too large for exact int32 accumulation (needs K < 131072)");
  const c10::cuda::CUDAGuard guard(x.device());
  check_capability("int8_dynamic_mm");
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0) return at::zeros({M, N}, x.options());
  auto [qx, sx] = quantize_per_token_int8_cuda(x);
  auto round_up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  const int64_t Mp = std::max<int64_t>(M, 32), Kp = round_up(K, 8), Np = round_up(N, 8);
  at::Tensor a = qx, w = q_w.contiguous();
  if (Mp != M || Kp != K) a = at::constant_pad_nd(qx, {0, Kp - K, 0, Mp - M}, 0);
  if (Np != N || Kp != K) w = at::constant_pad_nd(w, {0, Kp - K, 0, Np - N}, 0);
  // w.t() is the column-major [K, N] operand cuBLAS's int8 GEMM takes without a copy
  auto acc = at::_int_mm(a, w.t());
  if (Mp != M || Np != N) acc = acc.narrow(0, 0, M).narrow(1, 0, N);
  auto out = acc.to(at::kFloat).mul_(sx.unsqueeze(1)).mul_(w_scale.to(at::kFloat).unsqueeze(0));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("int4_weight_only_mm", &int4_weight_only_mm_cuda);
  m.impl("int8_weight_only_mm", &int8_weight_only_mm_cuda);
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cuda);
  m.impl("int8_dynamic_mm", &int8_dynamic_mm_cuda);
}

}  // namespace qkernels
