// CUDA entry points for the fp8 / fp4 casts and the emulated fp8 / fp4 GEMMs: argument checks (shared with the CPU
// kernels through qkernels/float_checks.h), allocation, device guard, current stream, launch checks and
// TORCH_LIBRARY_IMPL. The kernels are in float_cast.cu (see launchers.h for why the two are split).
//
// fp8_mm / fp4_mm here are the emulation for GPUs without the hardware path (the dispatch table sends sm89+ fp8 and
// sm100 e2m1 to torch._scaled_mm first): both operands are decoded to fp32 with their scales by the cast kernels and
// multiplied by cuBLAS sgemm, as csrc/cpu/emulated_mm.h does on CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "capability.h"
#include "launchers.h"
#include "qkernels/check.h"
#include "qkernels/float4.h"
#include "qkernels/float_checks.h"

namespace qkernels {

namespace cuda {
DType to_dtype(at::ScalarType t);  // int_quant_ops.cpp
}  // namespace cuda

namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// fp32 amax -> scales in place (block_amax writes fp32 bits into the zeroed scale buffer)
void amax_scales(const at::Tensor& x2d, int64_t br, int64_t bc, at::Tensor& s, int fp8_format, int nv_elem) {
  if (x2d.numel() > 0) {
    cuda::launch_block_amax(cuda::to_dtype(x2d.scalar_type()), x2d.data_ptr(), x2d.size(0), x2d.size(1), br, bc,
                            reinterpret_cast<int32_t*>(s.data_ptr<float>()), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  cuda::launch_scale_from_amax(s.data_ptr<float>(), s.numel(), fp8_format, nv_elem, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                     at::ScalarType dtype, int64_t block_rows, int64_t block_cols,
                                                     bool saturate) {
  check_float_input(x, "x");
  const int fmt = fp8_format_id(dtype, "dtype");
  const auto grid = check_blocks(x, block_rows, block_cols, "x");
  const int64_t R = x.size(0), C = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_capability("quantize_fp8");
  auto q = at::empty({R, C}, x.options().dtype(at::kByte));
  at::Tensor s;
  if (scale.has_value()) {
    s = checked_scale_copy(x, *scale, grid);
    if (R == 0 || C == 0) return {q, s};
  } else {
    s = at::zeros({grid[0], grid[1]}, x.options().dtype(at::kFloat));
    if (R == 0 || C == 0) return {q, s.fill_(1.f)};
  }
  auto xc = x.contiguous();
  if (!scale.has_value()) amax_scales(xc, block_rows, block_cols, s, fmt, -1);
  cuda::launch_quantize_fp8(cuda::to_dtype(x.scalar_type()), xc.data_ptr(), s.data_ptr<float>(), R, C, block_rows,
                            block_cols, fmt, saturate, q.data_ptr<uint8_t>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, s};
}

// q [R, C] (checked) -> out_dtype; shared by dequantize_fp8 and the fp8_mm emulation
at::Tensor dequantize_fp8_impl(const at::Tensor& q, const at::Tensor& scale, int fmt, int64_t br, int64_t bc,
                               at::ScalarType out_dtype) {
  auto out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  if (q.numel() == 0) return out;
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  cuda::launch_dequantize_fp8(qc.data_ptr<uint8_t>(), sc.data_ptr<float>(), q.size(0), q.size(1), br, bc, fmt,
                              cuda::to_dtype(out_dtype), out.data_ptr(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_fp8_cuda(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype, int64_t block_rows,
                               int64_t block_cols, at::ScalarType out_dtype) {
  check_dtype(q, at::kByte, "q");
  check_float_out_dtype(out_dtype);
  const int fmt = fp8_format_id(dtype, "dtype");
  const auto grid = check_blocks(q, block_rows, block_cols, "q");
  check_scale_grid(scale, grid, "scale");
  check_same_device(q, scale, "q", "scale");
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::check_capability("dequantize_fp8");
  return dequantize_fp8_impl(q, scale, fmt, block_rows, block_cols, out_dtype);
}

// fp32 af [M, K] @ bf [N, K]^T + bias -> out_dtype (cuBLAS sgemm; fp32 bias add like csrc/cpu/emulated_mm.h)
at::Tensor emulated_mm_cuda(const at::Tensor& af, const at::Tensor& bf, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype) {
  auto out = at::mm(af, bf.t());
  if (bias.has_value()) out.add_(bias->to(at::kFloat).reshape({1, bf.size(0)}));
  return out.to(out_dtype);
}

at::Tensor fp8_mm_cuda(const at::Tensor& a, const at::Tensor& a_scale, at::ScalarType a_dtype, const at::Tensor& b,
                       const at::Tensor& b_scale, at::ScalarType b_dtype, const std::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  const Fp8MmBlocks blk = check_fp8_mm_args(a, a_scale, a_dtype, b, b_scale, b_dtype, bias, out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  cuda::check_capability("fp8_mm");
  auto af = dequantize_fp8_impl(a, a_scale, fp8_format_id(a_dtype, "a_dtype"), blk.ba[0], blk.ba[1], at::kFloat);
  auto bf = dequantize_fp8_impl(b, b_scale, fp8_format_id(b_dtype, "b_dtype"), blk.bb[0], blk.bb[1], at::kFloat);
  return emulated_mm_cuda(af, bf, bias, out_dtype);
}

// Weight-only fp8: the weight decoded to x's dtype by the cast kernel, then cuBLAS (at::linear, fp32 accumulation).
// The decode-sized fused kernel is CPU-only so far; this is what QuantLinear ran before the op existed.
at::Tensor fp8_weight_only_mm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                   at::ScalarType w_dtype, const std::optional<at::Tensor>& bias) {
  const auto bb = check_fp8_weight_only_args(x, w, w_scale, w_dtype, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_capability("fp8_weight_only_mm");
  auto wd = dequantize_fp8_impl(w, w_scale, fp8_format_id(w_dtype, "w_dtype"), bb[0], bb[1], x.scalar_type());
  return at::linear(x, wd, bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt);
}

at::Tensor fp4_encode_cuda(const at::Tensor& x, c10::string_view element) {
  check_fp4_encode_input(x);
  const int elem = fp4_element_id(element);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_capability("fp4_encode");
  auto shape = x.sizes().vec();
  shape.back() /= 2;
  auto out = at::empty(shape, x.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  auto xc = x.contiguous();
  cuda::launch_fp4_encode(cuda::to_dtype(x.scalar_type()), xc.data_ptr(), out.numel(), elem, out.data_ptr<uint8_t>(),
                          stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor fp4_decode_cuda(const at::Tensor& packed, c10::string_view element, at::ScalarType out_dtype) {
  check_fp4_decode_input(packed, out_dtype);
  const int elem = fp4_element_id(element);
  const c10::cuda::CUDAGuard guard(packed.device());
  cuda::check_capability("fp4_decode");
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  auto out = at::empty(shape, packed.options().dtype(out_dtype));
  if (packed.numel() == 0) return out;
  auto pc = packed.contiguous();
  cuda::launch_fp4_decode(pc.data_ptr<uint8_t>(), pc.numel(), elem, cuda::to_dtype(out_dtype), out.data_ptr(),
                          stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp4_cuda(const at::Tensor& x, c10::string_view format,
                                                                 c10::string_view element,
                                                                 const std::optional<at::Tensor>& global_scale) {
  const bool nv = fp4_is_nv(format);
  const int elem = fp4_element_id(element);
  const int64_t B = nv ? kNVBlock : kMXBlock;
  check_quantize_fp4_input(x, format, B);
  const int64_t R = x.size(0), K = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_capability("quantize_fp4");
  auto xc = x.contiguous();
  at::Tensor g;
  if (!nv) {
    g = at::ones({}, x.options().dtype(at::kFloat));
  } else if (global_scale.has_value()) {
    check_same_device(x, *global_scale, "x", "global_scale");
    check_global_scale(*global_scale, "global_scale");
    g = global_scale->reshape({}).clone();
  } else {
    // per-tensor amax of the finite values -> amax / (448 * elem_max), 1 for an all-zero tensor
    g = at::zeros({}, x.options().dtype(at::kFloat));
    amax_scales(xc, std::max<int64_t>(R, 1), std::max<int64_t>(K, 1), g, kE4M3FN, elem);
  }
  auto packed = at::empty({R, K / 2}, x.options().dtype(at::kByte));
  auto scale = at::empty({R, K / B}, x.options().dtype(at::kByte));
  if (R * K > 0) {
    cuda::launch_quantize_fp4(cuda::to_dtype(x.scalar_type()), xc.data_ptr(), R, K, nv, elem, g.data_ptr<float>(),
                              packed.data_ptr<uint8_t>(), scale.data_ptr<uint8_t>(), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed, scale, g};
}

// packed [R, K/2] with scale [R, K/B] (checked) -> out_dtype; shared by dequantize_fp4 and the fp4_mm emulation.
// The global scale may live on the CPU (the CPU kernel reads it with .item()): it is copied over.
at::Tensor dequantize_fp4_impl(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& global_scale,
                               bool nv, int elem, at::ScalarType out_dtype) {
  const int64_t R = packed.size(0), K = packed.size(1) * 2;
  auto out = at::empty({R, K}, packed.options().dtype(out_dtype));
  if (R * K == 0) return out;
  auto pc = packed.contiguous(), sc = scale.contiguous();
  auto g = global_scale.to(packed.device()).contiguous();
  cuda::launch_dequantize_fp4(pc.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), g.data_ptr<float>(), R, K, nv, elem,
                              cuda::to_dtype(out_dtype), out.data_ptr(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_fp4_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& global_scale,
                               c10::string_view format, c10::string_view element, at::ScalarType out_dtype) {
  const bool nv = fp4_is_nv(format);
  const int elem = fp4_element_id(element);
  check_float_out_dtype(out_dtype);
  check_fp4_operand(packed, scale, nv ? kNVBlock : kMXBlock, "packed", "scale");
  check_global_scale(global_scale, "global_scale");
  const c10::cuda::CUDAGuard guard(packed.device());
  cuda::check_capability("dequantize_fp4");
  return dequantize_fp4_impl(packed, scale, global_scale, nv, elem, out_dtype);
}

at::Tensor fp4_mm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_global_scale,
                       const at::Tensor& b, const at::Tensor& b_scale, const at::Tensor& b_global_scale,
                       c10::string_view format, c10::string_view element, const std::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  const bool nv = fp4_is_nv(format);
  const int elem = fp4_element_id(element);
  check_fp4_mm_args(a, a_scale, a_global_scale, b, b_scale, b_global_scale, nv ? kNVBlock : kMXBlock, bias,
                    out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  cuda::check_capability("fp4_mm");
  auto af = dequantize_fp4_impl(a, a_scale, a_global_scale, nv, elem, at::kFloat);
  auto bf = dequantize_fp4_impl(b, b_scale, b_global_scale, nv, elem, at::kFloat);
  return emulated_mm_cuda(af, bf, bias, out_dtype);
}

// Weight-only fp4: decode to x's dtype, then cuBLAS (as fp8_weight_only_mm_cuda).
at::Tensor fp4_weight_only_mm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                   const at::Tensor& w_global_scale, c10::string_view format,
                                   c10::string_view element, const std::optional<at::Tensor>& bias) {
  const bool nv = fp4_is_nv(format);
  const int elem = fp4_element_id(element);
  check_fp4_weight_only_args(x, w, w_scale, w_global_scale, nv ? kNVBlock : kMXBlock, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_capability("fp4_weight_only_mm");
  auto wd = dequantize_fp4_impl(w, w_scale, w_global_scale, nv, elem, x.scalar_type());
  return at::linear(x, wd, bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("quantize_fp8", &quantize_fp8_cuda);
  m.impl("dequantize_fp8", &dequantize_fp8_cuda);
  m.impl("fp8_mm", &fp8_mm_cuda);
  m.impl("fp8_weight_only_mm", &fp8_weight_only_mm_cuda);
  m.impl("fp4_encode", &fp4_encode_cuda);
  m.impl("fp4_decode", &fp4_decode_cuda);
  m.impl("quantize_fp4", &quantize_fp4_cuda);
  m.impl("dequantize_fp4", &dequantize_fp4_cuda);
  m.impl("fp4_mm", &fp4_mm_cuda);
  m.impl("fp4_weight_only_mm", &fp4_weight_only_mm_cuda);
}

}  // namespace qkernels
