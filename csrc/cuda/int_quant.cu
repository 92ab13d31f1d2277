// CUDA kernels for integer affine quantization and int4 packing. Per-element math: qkernels/int_quant.h (the same
// functions the CPU kernels in csrc/cpu/int_quant.cpp run), so results are bit-identical to the CPU and to
// qkernels/reference/int_quant.py: fp32 arithmetic, IEEE division (nvcc's default -prec-div=true), rintf.
//
// Elementwise kernels move 8 elements per thread with 16-byte (bf16/fp16 and packed bytes) or 2x16-byte (fp32)
// vector loads when the group size, the element count and the pointers allow it, else one element per thread.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "qkernels/check.h"
#include "qkernels/int_quant.h"

namespace qkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

int64_t grid_for(int64_t work, int threads = kThreads) {
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 1 << 20));
}

bool aligned_to(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// fp32 / fp16 / bf16 only (what check_float_input accepts): keeps the instantiation count down.
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t);
  }
}

// ---- choose_qparams_affine: one warp per group ----------------------------------------------------------------
template <typename T>
__global__ void choose_qparams_kernel(const T* __restrict__ w, int64_t ngroups, int64_t group_size, int bits,
                                      bool symmetric, bool is_signed, bool float_zp, float* __restrict__ scale,
                                      int32_t* __restrict__ zp_int, float* __restrict__ zp_float,
                                      int* __restrict__ nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t g = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; g < ngroups; g += warps) {
    const T* src = w + g * group_size;
    float vmin = INFINITY, vmax = -INFINITY;
    bool finite = true;
    for (int64_t i = lane; i < group_size; i += 32) {
      const float v = static_cast<float>(src[i]);
      finite &= isfinite(v);
      vmin = v < vmin ? v : vmin;
      vmax = v > vmax ? v : vmax;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float omin = __shfl_xor_sync(0xffffffffu, vmin, off);
      const float omax = __shfl_xor_sync(0xffffffffu, vmax, off);
      vmin = omin < vmin ? omin : vmin;
      vmax = omax > vmax ? omax : vmax;
    }
    finite = __all_sync(0xffffffffu, finite);
    if (lane == 0) {
      if (!finite) *nonfinite = 1;
      if (float_zp) {
        float_zp_qparams(vmin, vmax, bits, scale + g, zp_float + g);
      } else {
        affine_qparams(vmin, vmax, bits, symmetric, is_signed, scale + g, zp_int + g);
      }
    }
  }
}

// ---- quantize_affine -------------------------------------------------------------------------------------------
template <typename T, typename Q, int V>
__global__ void quantize_kernel(const T* __restrict__ w, const float* __restrict__ scale,
                                const int32_t* __restrict__ zp_int, const float* __restrict__ zp_float,
                                int64_t nvec, int64_t group_size, int bits, bool float_zp, QRange r,
                                Q* __restrict__ q) {
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec; iv += (int64_t)gridDim.x * blockDim.x) {
    const int64_t idx = iv * V;
    const int64_t g = idx / group_size;  // V divides group_size: one group per vector
    const float s = scale[g];
    const Vec<T, V> in = reinterpret_cast<const Vec<T, V>*>(w)[iv];
    Vec<Q, V> out;
    if (float_zp) {
      const float mn = zp_float[g];
#pragma unroll
      for (int i = 0; i < V; ++i) out.v[i] = (Q)quantize_float_zp(static_cast<float>(in.v[i]), s, mn, bits);
    } else {
      const int32_t z = zp_int != nullptr ? zp_int[g] : 0;
#pragma unroll
      for (int i = 0; i < V; ++i) out.v[i] = (Q)quantize_int(static_cast<float>(in.v[i]), s, z, r);
    }
    reinterpret_cast<Vec<Q, V>*>(q)[iv] = out;
  }
}

// ---- dequantize_affine -----------------------------------------------------------------------------------------
template <typename Q, typename O, int V>
__global__ void dequantize_kernel(const Q* __restrict__ q, const float* __restrict__ scale,
                                  const int32_t* __restrict__ zp_int, const float* __restrict__ zp_float,
                                  int64_t nvec, int64_t group_size, bool float_zp, O* __restrict__ out) {
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec; iv += (int64_t)gridDim.x * blockDim.x) {
    const int64_t g = iv * V / group_size;
    const float s = scale[g];
    const Vec<Q, V> in = reinterpret_cast<const Vec<Q, V>*>(q)[iv];
    Vec<O, V> o;
    if (float_zp) {
      const float mn = zp_float[g];
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = static_cast<O>(dequantize_float_zp((int32_t)in.v[i], s, mn));
    } else {
      const int32_t z = zp_int != nullptr ? zp_int[g] : 0;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = static_cast<O>(dequantize_int((int32_t)in.v[i], s, z));
    }
    reinterpret_cast<Vec<O, V>*>(out)[iv] = o;
  }
}

// ---- pack / unpack int4 ----------------------------------------------------------------------------------------
template <int V>  // V output bytes (2V codes) per thread
__global__ void pack_int4_kernel(const uint8_t* __restrict__ in, bool is_signed, int64_t nvec,
                                 uint8_t* __restrict__ out, int* __restrict__ bad) {
  const int32_t lo_ok = is_signed ? -8 : 0, hi_ok = is_signed ? 7 : 15;
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec; iv += (int64_t)gridDim.x * blockDim.x) {
    const Vec<uint8_t, 2 * V> a = reinterpret_cast<const Vec<uint8_t, 2 * V>*>(in)[iv];
    Vec<uint8_t, V> o;
    bool local_bad = false;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int32_t lo = is_signed ? (int32_t)(int8_t)a.v[2 * i] : (int32_t)a.v[2 * i];
      const int32_t hi = is_signed ? (int32_t)(int8_t)a.v[2 * i + 1] : (int32_t)a.v[2 * i + 1];
      local_bad |= (lo < lo_ok) | (lo > hi_ok) | (hi < lo_ok) | (hi > hi_ok);
      o.v[i] = pack_nibbles(lo, hi);
    }
    if (local_bad) *bad = 1;
    reinterpret_cast<Vec<uint8_t, V>*>(out)[iv] = o;
  }
}

template <int V>  // V packed bytes in, 2V codes out per thread
__global__ void unpack_int4_kernel(const uint8_t* __restrict__ in, bool is_signed, int64_t nvec,
                                   uint8_t* __restrict__ out) {
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec; iv += (int64_t)gridDim.x * blockDim.x) {
    const Vec<uint8_t, V> a = reinterpret_cast<const Vec<uint8_t, V>*>(in)[iv];
    Vec<uint8_t, 2 * V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // int8 codes are written as their two's-complement bytes
      o.v[2 * i] = (uint8_t)nibble_value(a.v[i], is_signed);
      o.v[2 * i + 1] = (uint8_t)nibble_value(a.v[i] >> 4, is_signed);
    }
    reinterpret_cast<Vec<uint8_t, 2 * V>*>(out)[iv] = o;
  }
}

// ---- host entry points (argument checks mirror csrc/cpu/int_quant.cpp) -------------------------------------------

void check_zero_point(const at::Tensor& w, const std::optional<at::Tensor>& zero_point, int64_t group_size,
                      bool float_zero_point, const char* wname) {
  TORCH_CHECK(!float_zero_point || zero_point.has_value(), "zero_point (the group minimum) is required when "
              "float_zero_point=True");
  if (zero_point.has_value()) {
    check_dtype(*zero_point, float_zero_point ? at::kFloat : at::kInt, "zero_point");
    check_group_params(w, *zero_point, group_size, wname, "zero_point");
  }
}

std::tuple<at::Tensor, at::Tensor> choose_qparams_affine_cuda(const at::Tensor& w, int64_t bits, int64_t group_size,
                                                              bool symmetric, bool is_signed, bool float_zero_point) {
  check_float_input(w, "w");
  check_bits(bits);
  check_groups(w, group_size, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  auto wc = w.contiguous();
  auto pshape = w.sizes().vec();
  pshape.back() = w.size(-1) / group_size;
  auto scale = at::empty(pshape, w.options().dtype(at::kFloat));
  auto zp = at::empty(pshape, w.options().dtype(float_zero_point ? at::kFloat : at::kInt));
  const int64_t ngroups = scale.numel();
  if (ngroups == 0) return {scale, zp};
  auto flag = at::zeros({1}, w.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(w.scalar_type(), "w", [&](auto tag) {
    using T = decltype(tag);
    choose_qparams_kernel<T><<<(unsigned)grid_for(ngroups * 32), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(wc.data_ptr()), ngroups, group_size, (int)bits, symmetric, is_signed,
        float_zero_point, scale.data_ptr<float>(), float_zero_point ? nullptr : zp.data_ptr<int32_t>(),
        float_zero_point ? zp.data_ptr<float>() : nullptr, flag.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(flag.item<int>() == 0, "w contains NaN or inf; quantization needs finite values");
  return {scale, zp};
}

at::Tensor quantize_affine_cuda(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                                int64_t bits, int64_t group_size, bool is_signed, bool float_zero_point) {
  check_float_input(w, "w");
  check_bits(bits);
  check_groups(w, group_size, "w");
  check_dtype(scale, at::kFloat, "scale");
  check_group_params(w, scale, group_size, "w", "scale");
  TORCH_CHECK(!float_zero_point || !is_signed, "float_zero_point=True uses unsigned codes; pass is_signed=False");
  check_zero_point(w, zero_point, group_size, float_zero_point, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  // a NaN would reach a float->int conversion (undefined behaviour), so refuse it up front, as on CPU
  TORCH_CHECK(w.numel() == 0 || at::isfinite(w).all().item<bool>(),
              "w contains NaN or inf; quantization needs finite values");
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  auto q = at::empty(w.sizes(), w.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t n = w.numel();
  if (n == 0) return q;
  const QRange r = int_range((int)bits, is_signed);
  const int32_t* zi = (zc.defined() && !float_zero_point) ? zc.data_ptr<int32_t>() : nullptr;
  const float* zf = float_zero_point ? zc.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(w.scalar_type(), "w", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = reinterpret_cast<const T*>(wc.data_ptr());
    uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr());  // int8 and uint8 codes share the byte kernels' layout
    const bool vec = group_size % kVec == 0 && n % kVec == 0 && aligned_to(wp, sizeof(Vec<T, kVec>)) &&
                     aligned_to(qp, kVec);
    auto launch = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      const int64_t nvec = n / V;
      if (is_signed) {
        quantize_kernel<T, int8_t, V><<<(unsigned)grid_for(nvec), kThreads, 0, stream>>>(
            wp, sc.data_ptr<float>(), zi, zf, nvec, group_size, (int)bits, float_zero_point, r,
            reinterpret_cast<int8_t*>(qp));
      } else {
        quantize_kernel<T, uint8_t, V><<<(unsigned)grid_for(nvec), kThreads, 0, stream>>>(
            wp, sc.data_ptr<float>(), zi, zf, nvec, group_size, (int)bits, float_zero_point, r, qp);
      }
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

at::Tensor pack_int4_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte,
              "q must be int8 (values in [-8, 7]) or uint8 (values in [0, 15]), got ", q.scalar_type());
  TORCH_CHECK(q.dim() >= 1, "q must have at least 1 dim");
  TORCH_CHECK(q.size(-1) % 2 == 0, "the last dim of q must be even to pack two int4 per byte, got ", q.size(-1));
  const c10::cuda::CUDAGuard guard(q.device());
  const bool is_signed = q.scalar_type() == at::kChar;
  auto qc = q.contiguous();
  auto shape = q.sizes().vec();
  shape.back() /= 2;
  auto out = at::empty(shape, q.options().dtype(at::kByte));
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto bad = at::zeros({1}, q.options().dtype(at::kInt));
  const uint8_t* in = reinterpret_cast<const uint8_t*>(qc.data_ptr());
  uint8_t* o = out.data_ptr<uint8_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n % kVec == 0 && aligned_to(in, 2 * kVec) && aligned_to(o, kVec)) {
    pack_int4_kernel<kVec><<<(unsigned)grid_for(n / kVec), kThreads, 0, stream>>>(in, is_signed, n / kVec, o,
                                                                                 bad.data_ptr<int>());
  } else {
    pack_int4_kernel<1><<<(unsigned)grid_for(n), kThreads, 0, stream>>>(in, is_signed, n, o, bad.data_ptr<int>());
  }
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
  auto pc = packed.contiguous();
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  auto out = at::empty(shape, packed.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t n = pc.numel();
  if (n == 0) return out;
  const uint8_t* in = pc.data_ptr<uint8_t>();
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n % kVec == 0 && aligned_to(in, kVec) && aligned_to(o, 2 * kVec)) {
    unpack_int4_kernel<kVec><<<(unsigned)grid_for(n / kVec), kThreads, 0, stream>>>(in, is_signed, n / kVec, o);
  } else {
    unpack_int4_kernel<1><<<(unsigned)grid_for(n), kThreads, 0, stream>>>(in, is_signed, n, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// Not in the anonymous namespace: the W8A16 cuBLAS path in int_gemm.cu dequantizes through it.
at::Tensor dequantize_affine_cuda(const at::Tensor& q, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, int64_t group_size,
                                  bool float_zero_point, at::ScalarType out_dtype) {
  TORCH_CHECK(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte, "q must be int8 or uint8, got ",
              q.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf ||
                  out_dtype == at::kDouble,
              "out_dtype must be a floating dtype, got ", out_dtype);
  check_groups(q, group_size, "q");
  check_dtype(scale, at::kFloat, "scale");
  check_group_params(q, scale, group_size, "q", "scale");
  check_zero_point(q, zero_point, group_size, float_zero_point, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  auto out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  const int64_t n = q.numel();
  if (n == 0) return out;
  const int32_t* zi = (zc.defined() && !float_zero_point) ? zc.data_ptr<int32_t>() : nullptr;
  const float* zf = float_zero_point ? zc.data_ptr<float>() : nullptr;
  const bool q_signed = q.scalar_type() == at::kChar;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_affine_cuda", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const void* qp = qc.data_ptr();
    const bool vec = group_size % kVec == 0 && n % kVec == 0 && aligned_to(qp, kVec) &&
                     aligned_to(op, sizeof(Vec<scalar_t, kVec>));
    auto launch = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      const int64_t nvec = n / V;
      if (q_signed) {
        dequantize_kernel<int8_t, scalar_t, V><<<(unsigned)grid_for(nvec), kThreads, 0, stream>>>(
            reinterpret_cast<const int8_t*>(qp), sc.data_ptr<float>(), zi, zf, nvec, group_size, float_zero_point, op);
      } else {
        dequantize_kernel<uint8_t, scalar_t, V><<<(unsigned)grid_for(nvec), kThreads, 0, stream>>>(
            reinterpret_cast<const uint8_t*>(qp), sc.data_ptr<float>(), zi, zf, nvec, group_size, float_zero_point,
            op);
      }
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
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
