// CUDA kernels for integer affine quantization and int4 packing (host side, checks and registration:
// int_quant_ops.cpp). Per-element math: qkernels/int_quant.h, the same functions the CPU kernels in
// csrc/cpu/int_quant.cpp run, so results are bit-identical to the CPU and to qkernels/reference/int_quant.py: fp32
// arithmetic, IEEE division (nvcc's default -prec-div=true), rintf, no FMA contraction (mul_no_fma).
//
// Elementwise kernels move 8 elements per thread with 16-byte (bf16/fp16 and packed bytes) or 2x16-byte (fp32)
// vector loads when the group size, the element count and the pointers allow it, else one element per thread.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "convert.cuh"
#include "elementwise.cuh"
#include "launchers.h"
#include "qkernels/int_quant.h"

namespace qkernels {
namespace cuda {
namespace {

// fp32 / fp16 / bf16 (and fp64 where `with_double`) by DType; f receives a value of the element type.
template <typename F>
void dispatch_float(DType t, const F& f) {
  switch (t) {
    case DType::kFloat: f(float{}); break;
    case DType::kHalf: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kDouble: f(double{}); break;
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
      const float v = to_f32(src[i]);
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
      for (int i = 0; i < V; ++i) out.v[i] = (Q)quantize_float_zp(to_f32(in.v[i]), s, mn, bits);
    } else {
      const int32_t z = zp_int != nullptr ? zp_int[g] : 0;
#pragma unroll
      for (int i = 0; i < V; ++i) out.v[i] = (Q)quantize_int(to_f32(in.v[i]), s, z, r);
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
      for (int i = 0; i < V; ++i) o.v[i] = from_f32<O>(dequantize_float_zp((int32_t)in.v[i], s, mn));
    } else {
      const int32_t z = zp_int != nullptr ? zp_int[g] : 0;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = from_f32<O>(dequantize_int((int32_t)in.v[i], s, z));
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


// ---- quantize_per_token_int8: one warp per row ---------------------------------------------------------------------
// Same arithmetic as csrc/cpu/int_gemm.cpp: scale = amax / 127 (1 if 0), q = clamp(rne(x / scale), -127, 127); a row
// with NaN/inf gets scale NaN and zero codes.
template <typename T>
__global__ void quantize_per_token_int8_kernel(const T* __restrict__ x, int64_t M, int64_t K, int8_t* __restrict__ q,
                                               float* __restrict__ scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t m = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; m < M; m += warps) {
    const T* row = x + m * K;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = lane; k < K; k += 32) {
      const float v = to_f32(row[k]);
      finite &= isfinite(v);
      amax = fmaxf(amax, fabsf(v));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    finite = __all_sync(0xffffffffu, finite);
    float s = amax / 127.f;
    s = s > 0.f ? s : 1.f;
    if (lane == 0) scale[m] = finite ? s : __int_as_float(0x7FC00000);
    int8_t* qr = q + m * K;
    for (int64_t k = lane; k < K; k += 32)
      qr[k] = finite ? (int8_t)clampf(round_half_even(to_f32(row[k]) / s), -127.f, 127.f) : (int8_t)0;
  }
}

}  // namespace

void launch_choose_qparams(DType wt, const void* w, int64_t ngroups, int64_t group_size, int bits, bool symmetric,
                           bool is_signed, bool float_zp, float* scale, int32_t* zp_int, float* zp_float,
                           int* nonfinite, cudaStream_t stream) {
  dispatch_float(wt, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, double>::value) {
      choose_qparams_kernel<T><<<grid_for(ngroups * 32), kThreads, 0, stream>>>(
          static_cast<const T*>(w), ngroups, group_size, bits, symmetric, is_signed, float_zp, scale, zp_int,
          zp_float, nonfinite);
    }
  });
}

void launch_quantize(DType wt, const void* w, const float* scale, const int32_t* zp_int, const float* zp_float,
                     int64_t n, int64_t group_size, int bits, bool is_signed, bool float_zp, void* q,
                     cudaStream_t stream) {
  const QRange r = int_range(bits, is_signed);
  dispatch_float(wt, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, double>::value) {
      const T* wp = static_cast<const T*>(w);
      const bool vec = group_size % kVec == 0 && n % kVec == 0 && aligned_to(wp, sizeof(Vec<T, kVec>)) &&
                       aligned_to(q, kVec);
      auto launch = [&](auto v_tag) {
        constexpr int V = decltype(v_tag)::value;
        const int64_t nvec = n / V;
        if (is_signed) {
          quantize_kernel<T, int8_t, V><<<grid_for(nvec), kThreads, 0, stream>>>(
              wp, scale, zp_int, zp_float, nvec, group_size, bits, float_zp, r, static_cast<int8_t*>(q));
        } else {
          quantize_kernel<T, uint8_t, V><<<grid_for(nvec), kThreads, 0, stream>>>(
              wp, scale, zp_int, zp_float, nvec, group_size, bits, float_zp, r, static_cast<uint8_t*>(q));
        }
      };
      if (vec) {
        launch(std::integral_constant<int, kVec>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    }
  });
}

void launch_dequantize(bool q_signed, const void* q, const float* scale, const int32_t* zp_int, const float* zp_float,
                       int64_t n, int64_t group_size, bool float_zp, DType out_t, void* out, cudaStream_t stream) {
  dispatch_float(out_t, [&](auto tag) {
    using O = decltype(tag);
    O* op = static_cast<O*>(out);
    const bool vec = group_size % kVec == 0 && n % kVec == 0 && aligned_to(q, kVec) &&
                     aligned_to(op, sizeof(Vec<O, kVec>));
    auto launch = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      const int64_t nvec = n / V;
      if (q_signed) {
        dequantize_kernel<int8_t, O, V><<<grid_for(nvec), kThreads, 0, stream>>>(
            static_cast<const int8_t*>(q), scale, zp_int, zp_float, nvec, group_size, float_zp, op);
      } else {
        dequantize_kernel<uint8_t, O, V><<<grid_for(nvec), kThreads, 0, stream>>>(
            static_cast<const uint8_t*>(q), scale, zp_int, zp_float, nvec, group_size, float_zp, op);
      }
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

void launch_pack_int4(const uint8_t* in, bool is_signed, int64_t n_out, uint8_t* out, int* bad, cudaStream_t stream) {
  if (n_out % kVec == 0 && aligned_to(in, 2 * kVec) && aligned_to(out, kVec)) {
    pack_int4_kernel<kVec><<<grid_for(n_out / kVec), kThreads, 0, stream>>>(in, is_signed, n_out / kVec, out, bad);
  } else {
    pack_int4_kernel<1><<<grid_for(n_out), kThreads, 0, stream>>>(in, is_signed, n_out, out, bad);
  }
}

void launch_unpack_int4(const uint8_t* in, bool is_signed, int64_t n_in, uint8_t* out, cudaStream_t stream) {
  if (n_in % kVec == 0 && aligned_to(in, kVec) && aligned_to(out, 2 * kVec)) {
    unpack_int4_kernel<kVec><<<grid_for(n_in / kVec), kThreads, 0, stream>>>(in, is_signed, n_in / kVec, out);
  } else {
    unpack_int4_kernel<1><<<grid_for(n_in), kThreads, 0, stream>>>(in, is_signed, n_in, out);
  }
}

void launch_quantize_per_token_int8(DType xt, const void* x, int64_t M, int64_t K, int8_t* q, float* scale,
                                    cudaStream_t stream) {
  dispatch_float(xt, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, double>::value) {
      quantize_per_token_int8_kernel<T><<<grid_for(M * 32), kThreads, 0, stream>>>(static_cast<const T*>(x), M, K, q,
                                                                                   scale);
    }
  });
}

}  // namespace cuda
}  // namespace qkernels
