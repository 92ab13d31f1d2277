// CUDA entry points for the integer dequant-GEMMs W4A16 / W8A16: argument checks (mirroring csrc/cpu/int_gemm.cpp),
// the choice between the tensor-core decode kernel and dequantize + cuBLAS (see int_gemm.cu), the capability switch,
// device guard, current stream, launch checks and TORCH_LIBRARY_IMPL.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

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

// Device attributes through the runtime API: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers that a
// bare CUDA toolkit (as on the CI and build machines) may not ship.
int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}

// Capability switch over the archs this build targets (setup.py passes -DQK_ENABLE_SMxx per TORCH_CUDA_ARCH_LIST
// entry); the mma.sync kernel itself is the same source for every sm80+ arch. Which binary actually loads on a given
// minor is the driver's business; qkernels.dispatch.arch_runs mirrors it.
void check_capability(const char* op) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
  switch (major) {
#if defined(QK_ENABLE_SM80) || defined(QK_ENABLE_SM86) || defined(QK_ENABLE_SM87) || defined(QK_ENABLE_SM89)
    case 8: return;
#endif
#if defined(QK_ENABLE_SM90)
    case 9: return;
#endif
#if defined(QK_ENABLE_SM100) || defined(QK_ENABLE_SM103)
    case 10: return;
#endif
#if defined(QK_ENABLE_SM120) || defined(QK_ENABLE_SM121)
    case 12: return;
#endif
    default: break;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, " CUDA kernel not implemented for capability ", major, ".", minor,
                              " (not in this build's TORCH_CUDA_ARCH_LIST)");
}

bool decode_path(const at::Tensor& xc, const at::Tensor& wc, int64_t K, int64_t group_size) {
  const bool half_x = xc.scalar_type() == at::kHalf || xc.scalar_type() == at::kBFloat16;
  return half_x && xc.size(0) <= cuda::kMmaMaxM && K % 32 == 0 && group_size % 32 == 0 &&
         aligned16(xc.data_ptr()) && aligned16(wc.data_ptr());
}

at::Tensor run_mma(const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& sc, const int32_t* zp, bool w4,
                   bool is_signed, int64_t N, int64_t K, int64_t group_size) {
  const int64_t M = xc.size(0);
  TORCH_CHECK(N < (1LL << 37) && M <= cuda::kMmaMaxM, "int GEMM too large for the decode kernel: N=", N, ", M=", M);
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

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("int4_weight_only_mm", &int4_weight_only_mm_cuda);
  m.impl("int8_weight_only_mm", &int8_weight_only_mm_cuda);
}

}  // namespace qkernels
