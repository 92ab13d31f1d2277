// CUDA entry points for integer affine quantization and int4 packing: argument checks (mirroring
// csrc/cpu/int_quant.cpp), allocation, device guard, current stream, launch checks, TORCH_LIBRARY_IMPL. The kernels
// are in int_quant.cu (see launchers.h for why the two are split).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "capability.h"
#include "launchers.h"
#include "qkernels/check.h"
#include "qkernels/int_checks.h"

namespace qkernels {

namespace cuda {
DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "no CUDA kernel for dtype ", t);
  }
}
}  // namespace cuda

namespace {

std::tuple<at::Tensor, at::Tensor> choose_qparams_affine_cuda(const at::Tensor& w, int64_t bits, int64_t group_size,
                                                              bool symmetric, bool is_signed, bool float_zero_point) {
  check_float_input(w, "w");
  check_bits(bits);
  check_groups(w, group_size, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  cuda::check_capability("choose_qparams_affine");
  auto wc = w.contiguous();
  auto pshape = w.sizes().vec();
  pshape.back() = w.size(-1) / group_size;
  auto scale = at::empty(pshape, w.options().dtype(at::kFloat));
  auto zp = at::empty(pshape, w.options().dtype(float_zero_point ? at::kFloat : at::kInt));
  const int64_t ngroups = scale.numel();
  if (ngroups == 0) return {scale, zp};
  auto flag = at::zeros({1}, w.options().dtype(at::kInt));
  cuda::launch_choose_qparams(cuda::to_dtype(w.scalar_type()), wc.data_ptr(), ngroups, group_size, (int)bits,
                              symmetric, is_signed, float_zero_point, scale.data_ptr<float>(),
                              float_zero_point ? nullptr : zp.data_ptr<int32_t>(),
                              float_zero_point ? zp.data_ptr<float>() : nullptr, flag.data_ptr<int>(),
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(flag.item<int>() == 0, "w contains NaN or inf; quantization needs finite values");
  return {scale, zp};
}

at::Tensor quantize_affine_cuda(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                                int64_t bits, int64_t group_size, bool is_signed, bool float_zero_point) {
  check_quantize_affine_args(w, scale, zero_point, bits, group_size, is_signed, float_zero_point);
  const c10::cuda::CUDAGuard guard(w.device());
  cuda::check_capability("quantize_affine");
  // a NaN would reach a float->int conversion (undefined behaviour), so refuse it up front, as on CPU
  TORCH_CHECK(w.numel() == 0 || at::isfinite(w).all().item<bool>(),
              "w contains NaN or inf; quantization needs finite values");
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  auto q = at::empty(w.sizes(), w.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t n = w.numel();
  if (n == 0) return q;
  cuda::launch_quantize(cuda::to_dtype(w.scalar_type()), wc.data_ptr(), sc.data_ptr<float>(),
                        (zc.defined() && !float_zero_point) ? zc.data_ptr<int32_t>() : nullptr,
                        float_zero_point ? zc.data_ptr<float>() : nullptr, n, group_size, (int)bits, is_signed,
                        float_zero_point, q.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

at::Tensor pack_int4_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte,
              "q must be int8 (values in [-8, 7]) or uint8 (values in [0, 15]), got ", q.scalar_type());
  TORCH_CHECK(q.dim() >= 1, "q must have at least 1 dim");
  TORCH_CHECK(q.size(-1) % 2 == 0, "the last dim of q must be even to pack two int4 per byte, got ", q.size(-1));
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::check_capability("pack_int4");
  const bool is_signed = q.scalar_type() == at::kChar;
  auto qc = q.contiguous();
  auto shape = q.sizes().vec();
  shape.back() /= 2;
  auto out = at::empty(shape, q.options().dtype(at::kByte));
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto bad = at::zeros({1}, q.options().dtype(at::kInt));
  cuda::launch_pack_int4(static_cast<const uint8_t*>(qc.data_ptr()), is_signed, n, out.data_ptr<uint8_t>(),
                         bad.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int32_t lo = is_signed ? -8 : 0, hi = is_signed ? 7 : 15;
  TORCH_CHECK(bad.item<int>() == 0, "q has values outside the int4 range [", lo, ", ", hi, "] for dtype ",
              q.scalar_type());
  return out;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed, bool is_signed) {
  check_dtype(packed, at::kByte, "packed");
  TORCH_CHECK(packed.dim() >= 1, "packed must have at least 1 dim");
  const c10::cuda::CUDAGuard guard(packed.device());
  cuda::check_capability("unpack_int4");
  auto pc = packed.contiguous();
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  auto out = at::empty(shape, packed.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t n = pc.numel();
  if (n == 0) return out;
  cuda::launch_unpack_int4(pc.data_ptr<uint8_t>(), is_signed, n, static_cast<uint8_t*>(out.data_ptr()),
                           c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// Not in the anonymous namespace: the W8A16 cuBLAS path in int_gemm_ops.cpp dequantizes through it.
at::Tensor dequantize_affine_cuda(const at::Tensor& q, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, int64_t group_size,
                                  bool float_zero_point, at::ScalarType out_dtype) {
  check_dequantize_affine_args(q, scale, zero_point, group_size, float_zero_point, out_dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::check_capability("dequantize_affine");
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  auto out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  const int64_t n = q.numel();
  if (n == 0) return out;
  cuda::launch_dequantize(q.scalar_type() == at::kChar, qc.data_ptr(), sc.data_ptr<float>(),
                          (zc.defined() && !float_zero_point) ? zc.data_ptr<int32_t>() : nullptr,
                          float_zero_point ? zc.data_ptr<float>() : nullptr, n, group_size, float_zero_point,
                          cuda::to_dtype(out_dtype), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("choose_qparams_affine", &choose_qparams_affine_cuda);
  m.impl("quantize_affine", &quantize_affine_cuda);
  m.impl("dequantize_affine", &dequantize_affine_cuda);
  m.impl("pack_int4", &pack_int4_cuda);
  m.impl("unpack_int4", &unpack_int4_cuda);
}

}  // namespace qkernels
