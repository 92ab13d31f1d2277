// CUDA kernels for the fp8 and fp4 casts (host side, checks and registration: float_cast_ops.cpp). Per-element math:
// qkernels/float8.h and float4.h, the functions the CPU kernels in csrc/cpu/float8.cpp / float4.cpp run, so results
// are bit-identical to the CPU and to qkernels/reference/float8.py / float4.py (fp32 arithmetic, IEEE division:
// nvcc's default -prec-div=true).
//
// Hardware conversions, each compiled only for the archs that have the instruction and patched to the reference's
// NaN codes (the instructions' NaN outputs are not specified bit for bit):
//  * sm89+ : cvt.rn.satfinite.{e4m3,e5m2}x2.f32 for the saturating e4m3fn / e5m2 casts (the non-saturating mode
//    and the fnuz formats have no instruction: software), cvt.rn.f16x2.{e4m3,e5m2}x2 for their decode;
//  * sm100a/sm103a (family-specific targets): cvt.rn.satfinite.e2m1x2.f32 and cvt.rn.f16x2.e2m1x2 for fp4 e2m1.
// Everywhere else (sm80, e1m2, fnuz) the shared software conversion runs.
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "convert.cuh"
#include "elementwise.cuh"
#include "launchers.h"
#include "qkernels/float4.h"
#include "qkernels/float8.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define QK_HW_FP8_CVT 1
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000 && __CUDA_ARCH__ < 1100 && \
    (defined(__CUDA_ARCH_FAMILY_SPECIFIC__) || defined(__CUDA_ARCH_SPECIFIC__))
#define QK_HW_FP4_CVT 1
#endif

namespace qkernels {
namespace cuda {
namespace {

// index of the (br x bc) scale block holding flat element idx of a [R, C] tensor with nbc blocks per row
__device__ __forceinline__ int64_t block_index(int64_t idx, int64_t C, int64_t br, int64_t bc, int64_t nbc) {
  const int64_t r = idx / C, c = idx - r * C;
  return (r / br) * nbc + c / bc;
}

template <typename F>
void dispatch_input(DType t, const F& f) {  // the three float input dtypes of the casts
  switch (t) {
    case DType::kFloat: f(float{}); break;
    case DType::kHalf: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kDouble: break;  // rejected by the host checks
  }
}

template <typename F>
void dispatch_output(DType t, const F& f) {
  switch (t) {
    case DType::kFloat: f(float{}); break;
    case DType::kHalf: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kDouble: f(double{}); break;
  }
}

// Which hardware fp8 conversion a format has: 0 none, 1 e4m3 (OCP e4m3fn), 2 e5m2 (OCP). Decided on the host; the
// device code ignores it on archs without the instructions.
int hw_fp8_kind(int fmt) { return fmt == kE4M3FN ? 1 : (fmt == kE5M2 ? 2 : 0); }

// ---- per-element conversions ------------------------------------------------------------------------------------
__device__ __forceinline__ uint8_t encode_fp8(float v, const MiniFloatEncoder& enc, int hw) {
#if defined(QK_HW_FP8_CVT)
  if (hw != 0) {
    const uint8_t c = (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, hw == 2 ? __NV_E5M2 : __NV_E4M3);
    return isnan(v) ? (uint8_t)(signbit(v) ? enc.nan_neg : enc.nan_pos) : c;
  }
#endif
  return minifloat_encode(v, enc);
}

__device__ __forceinline__ float decode_fp8(uint32_t c, const MiniFloat& f, int hw) {
#if defined(QK_HW_FP8_CVT)
  // fp16 holds every e4m3 / e5m2 value exactly, so the widening to fp32 is exact too
  if (hw != 0) return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, hw == 2 ? __NV_E5M2
                                                                                                   : __NV_E4M3)));
#endif
  return minifloat_to_float(c, f);
}

// Two fp4 codes in one byte (a in the low nibble). The formats have no NaN: NaN encodes as the -0 code 0x8.
__device__ __forceinline__ uint8_t encode_fp4_pair(float a, float b, const MiniFloatEncoder& enc, bool e2m1) {
#if defined(QK_HW_FP4_CVT)
  if (e2m1) {
    uint16_t r;
    // the instruction packs its first source operand into the upper nibble
    asm("{ .reg .b8 t;\n cvt.rn.satfinite.e2m1x2.f32 t, %2, %1;\n mov.b16 %0, {t, 0};\n}" : "=h"(r) : "f"(a), "f"(b));
    const uint32_t lo = isnan(a) ? 0x8u : (r & 0xFu), hi = isnan(b) ? 0x8u : ((r >> 4) & 0xFu);
    return (uint8_t)(lo | (hi << 4));
  }
#endif
  return (uint8_t)(minifloat_encode(a, enc) | (minifloat_encode(b, enc) << 4));
}

__device__ __forceinline__ float2 decode_fp4_pair(uint32_t byte, const MiniFloat& f, bool e2m1) {
#if defined(QK_HW_FP4_CVT)
  if (e2m1) {
    uint32_t h2;
    asm("{ .reg .b8 t, z;\n mov.b16 {t, z}, %1;\n cvt.rn.f16x2.e2m1x2 %0, t;\n}" : "=r"(h2) : "h"((uint16_t)byte));
    __half_raw lo, hi;
    lo.x = (unsigned short)(h2 & 0xFFFFu);
    hi.x = (unsigned short)(h2 >> 16);
    return make_float2(__half2float(__half(lo)), __half2float(__half(hi)));
  }
#endif
  return make_float2(fp4_decode(byte & 0xFu, f), fp4_decode(byte >> 4, f));
}

// ---- block amax (finite values) ---------------------------------------------------------------------------------
// Non-negative floats order like their bit patterns, so the max is an integer atomicMax. A warp whose 32 elements
// fall in one block folds them first; with a single block (per-tensor) each thread folds its whole grid-stride range.
template <typename T>
__global__ void block_amax_kernel(const T* __restrict__ x, int64_t n, int64_t C, int64_t br, int64_t bc,
                                  int64_t nbc, bool single, int32_t* __restrict__ amax) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int32_t local = 0;
  for (int64_t i0 = (int64_t)blockIdx.x * blockDim.x + (threadIdx.x & ~31); i0 < n; i0 += stride) {
    const int64_t i = i0 + lane;
    int64_t blk = -1;
    int32_t a = 0;
    if (i < n) {
      const uint32_t u = f32_bits(to_f32(x[i])) & 0x7FFFFFFFu;
      a = u < 0x7F800000u ? (int32_t)u : 0;
      blk = block_index(i, C, br, bc, nbc);
    }
    if (single) {
      local = max(local, a);
      continue;
    }
    const int64_t b0 = __shfl_sync(0xffffffffu, blk, 0);
    if (__all_sync(0xffffffffu, blk == b0 || blk < 0)) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) a = max(a, __shfl_xor_sync(0xffffffffu, a, off));
      if (lane == 0) atomicMax(amax + b0, a);
    } else if (blk >= 0) {
      atomicMax(amax + blk, a);
    }
  }
  if (single) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) local = max(local, __shfl_xor_sync(0xffffffffu, local, off));
    if (lane == 0) atomicMax(amax, local);
  }
}

__global__ void scale_from_amax_kernel(float* __restrict__ s, int64_t n, MiniFloat fp8, bool nv, MiniFloat elem) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float amax = s[i];  // written as bits by block_amax_kernel
    s[i] = nv ? nv_global_scale(amax, elem) : fp8_scale_from_amax(amax, minifloat_max(fp8));
  }
}

// ---- fp8 quantize / dequantize: V consecutive elements of one block per thread ----------------------------------
template <typename T, int V>
__global__ void quantize_fp8_kernel(const T* __restrict__ x, const float* __restrict__ scale, int64_t nvec, int64_t C,
                                    int64_t br, int64_t bc, int64_t nbc, MiniFloatEncoder enc, int hw,
                                    uint8_t* __restrict__ q) {
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec; iv += (int64_t)gridDim.x * blockDim.x) {
    const float s = scale[block_index(iv * V, C, br, bc, nbc)];
    const Vec<T, V> in = reinterpret_cast<const Vec<T, V>*>(x)[iv];
    Vec<uint8_t, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = encode_fp8(to_f32(in.v[i]) / s, enc, hw);
    reinterpret_cast<Vec<uint8_t, V>*>(q)[iv] = out;
  }
}

template <typename O, int V>
__global__ void dequantize_fp8_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale, int64_t nvec,
                                      int64_t C, int64_t br, int64_t bc, int64_t nbc, MiniFloat f, int hw,
                                      O* __restrict__ out) {
  for (int64_t iv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; iv < nvec; iv += (int64_t)gridDim.x * blockDim.x) {
    const float s = scale[block_index(iv * V, C, br, bc, nbc)];
    const Vec<uint8_t, V> in = reinterpret_cast<const Vec<uint8_t, V>*>(q)[iv];
    Vec<O, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = from_f32<O>(decode_fp8(in.v[i], f, hw) * s);
    reinterpret_cast<Vec<O, V>*>(out)[iv] = o;
  }
}

// ---- fp4 elements ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void fp4_encode_kernel(const T* __restrict__ x, int64_t n_bytes, MiniFloatEncoder enc, bool e2m1,
                                  uint8_t* __restrict__ packed) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_bytes; i += (int64_t)gridDim.x * blockDim.x)
    packed[i] = encode_fp4_pair(to_f32(x[2 * i]), to_f32(x[2 * i + 1]), enc, e2m1);
}

template <typename O>
__global__ void fp4_decode_kernel(const uint8_t* __restrict__ packed, int64_t n_bytes, MiniFloat f, bool e2m1,
                                  O* __restrict__ out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_bytes; i += (int64_t)gridDim.x * blockDim.x) {
    const float2 v = decode_fp4_pair(packed[i], f, e2m1);
    out[2 * i] = from_f32<O>(v.x);
    out[2 * i + 1] = from_f32<O>(v.y);
  }
}

// ---- MXFP4 / NVFP4 blocks: one thread per block of B elements -----------------------------------------------------
template <typename T, int B>
__global__ void quantize_fp4_kernel(const T* __restrict__ x, int64_t nblocks, MiniFloat elem, MiniFloatEncoder enc,
                                    bool e2m1, const float* __restrict__ global_scale, uint8_t* __restrict__ packed,
                                    uint8_t* __restrict__ scale) {
  constexpr bool nv = B == kNVBlock;
  const float g = nv ? *global_scale : 1.f;
  for (int64_t blk = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; blk < nblocks;
       blk += (int64_t)gridDim.x * blockDim.x) {
    const T* src = x + blk * B;
    float v[B];
    uint32_t amax = 0;
    bool finite = true;
#pragma unroll
    for (int i = 0; i < B; ++i) {
      v[i] = to_f32(src[i]);
      const uint32_t a = f32_bits(v[i]) & 0x7FFFFFFFu;
      finite &= a < 0x7F800000u;
      amax = a < 0x7F800000u && a > amax ? a : amax;
    }
    // as csrc/cpu/float4.cpp: a non-finite block gets the NaN scale code and zero codes, as does (NV) a block whose
    // scale rounds to 0
    const uint8_t code = !finite ? (nv ? 0x7F : 0xFF)
                                 : (nv ? nv_scale_code(bits_f32(amax), g, elem) : mx_scale_code(bits_f32(amax), elem));
    scale[blk] = code;
    const float s = fp4_block_scale(code, nv, g);
    const bool usable = s > 0.f;
    Vec<uint8_t, B / 2> out;
#pragma unroll
    for (int i = 0; i < B / 2; ++i)
      out.v[i] = usable ? encode_fp4_pair(v[2 * i] / s, v[2 * i + 1] / s, enc, e2m1) : (uint8_t)0;
    reinterpret_cast<Vec<uint8_t, B / 2>*>(packed)[blk] = out;
  }
}

template <typename O>
__global__ void dequantize_fp4_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ scale,
                                      const float* __restrict__ global_scale, int64_t n_bytes, int B, bool nv,
                                      MiniFloat f, bool e2m1, O* __restrict__ out) {
  const float g = nv ? *global_scale : 1.f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_bytes; i += (int64_t)gridDim.x * blockDim.x) {
    // B is even and rows hold a whole number of blocks, so block index = flat element index / B
    const float s = fp4_block_scale(scale[2 * i / B], nv, g);
    const float2 v = decode_fp4_pair(packed[i], f, e2m1);
    out[2 * i] = from_f32<O>(v.x * s);
    out[2 * i + 1] = from_f32<O>(v.y * s);
  }
}

}  // namespace

void launch_block_amax(DType xt, const void* x, int64_t R, int64_t C, int64_t br, int64_t bc, int32_t* amax_bits,
                       cudaStream_t stream) {
  const int64_t n = R * C, nbc = C / bc;
  const bool single = br == R && bc == C;
  dispatch_input(xt, [&](auto tag) {
    using T = decltype(tag);
    block_amax_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(x), n, C, br, bc, nbc, single,
                                                               amax_bits);
  });
}

void launch_scale_from_amax(float* s, int64_t n, int fp8_format, int nv_elem_format, cudaStream_t stream) {
  const bool nv = nv_elem_format >= 0;
  scale_from_amax_kernel<<<grid_for(n), kThreads, 0, stream>>>(s, n, minifloat_format(fp8_format), nv,
                                                               minifloat_format(nv ? nv_elem_format : kE2M1));
}

void launch_quantize_fp8(DType xt, const void* x, const float* scale, int64_t R, int64_t C, int64_t br, int64_t bc,
                         int fp8_format, bool saturate, uint8_t* q, cudaStream_t stream) {
  const MiniFloatEncoder enc = make_encoder(minifloat_format(fp8_format), saturate);
  const int hw = saturate ? hw_fp8_kind(fp8_format) : 0;  // the instructions only saturate
  const int64_t n = R * C, nbc = C / bc;
  dispatch_input(xt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    if (bc % kVec == 0 && aligned_to(xp, sizeof(Vec<T, kVec>)) && aligned_to(q, kVec)) {
      quantize_fp8_kernel<T, kVec><<<grid_for(n / kVec), kThreads, 0, stream>>>(xp, scale, n / kVec, C, br, bc, nbc,
                                                                                enc, hw, q);
    } else {
      quantize_fp8_kernel<T, 1><<<grid_for(n), kThreads, 0, stream>>>(xp, scale, n, C, br, bc, nbc, enc, hw, q);
    }
  });
}

void launch_dequantize_fp8(const uint8_t* q, const float* scale, int64_t R, int64_t C, int64_t br, int64_t bc,
                           int fp8_format, DType out_t, void* out, cudaStream_t stream) {
  const MiniFloat f = minifloat_format(fp8_format);
  const int hw = hw_fp8_kind(fp8_format);
  const int64_t n = R * C, nbc = C / bc;
  dispatch_output(out_t, [&](auto tag) {
    using O = decltype(tag);
    O* op = static_cast<O*>(out);
    if (bc % kVec == 0 && aligned_to(q, kVec) && aligned_to(op, sizeof(Vec<O, kVec>))) {
      dequantize_fp8_kernel<O, kVec><<<grid_for(n / kVec), kThreads, 0, stream>>>(q, scale, n / kVec, C, br, bc, nbc,
                                                                                  f, hw, op);
    } else {
      dequantize_fp8_kernel<O, 1><<<grid_for(n), kThreads, 0, stream>>>(q, scale, n, C, br, bc, nbc, f, hw, op);
    }
  });
}

void launch_fp4_encode(DType xt, const void* x, int64_t n_bytes, int elem_format, uint8_t* packed,
                       cudaStream_t stream) {
  const MiniFloatEncoder enc = make_encoder(minifloat_format(elem_format), true);
  dispatch_input(xt, [&](auto tag) {
    using T = decltype(tag);
    fp4_encode_kernel<T><<<grid_for(n_bytes), kThreads, 0, stream>>>(static_cast<const T*>(x), n_bytes, enc,
                                                                      elem_format == kE2M1, packed);
  });
}

void launch_fp4_decode(const uint8_t* packed, int64_t n_bytes, int elem_format, DType out_t, void* out,
                       cudaStream_t stream) {
  dispatch_output(out_t, [&](auto tag) {
    using O = decltype(tag);
    fp4_decode_kernel<O><<<grid_for(n_bytes), kThreads, 0, stream>>>(packed, n_bytes, minifloat_format(elem_format),
                                                                      elem_format == kE2M1, static_cast<O*>(out));
  });
}

void launch_quantize_fp4(DType xt, const void* x, int64_t R, int64_t K, bool nv, int elem_format,
                         const float* global_scale, uint8_t* packed, uint8_t* scale, cudaStream_t stream) {
  const MiniFloat elem = minifloat_format(elem_format);
  const MiniFloatEncoder enc = make_encoder(elem, true);
  const bool e2m1 = elem_format == kE2M1;
  dispatch_input(xt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    if (nv) {
      const int64_t nb = R * (K / kNVBlock);
      quantize_fp4_kernel<T, kNVBlock><<<grid_for(nb), kThreads, 0, stream>>>(xp, nb, elem, enc, e2m1, global_scale,
                                                                               packed, scale);
    } else {
      const int64_t nb = R * (K / kMXBlock);
      quantize_fp4_kernel<T, kMXBlock><<<grid_for(nb), kThreads, 0, stream>>>(xp, nb, elem, enc, e2m1, global_scale,
                                                                               packed, scale);
    }
  });
}

void launch_dequantize_fp4(const uint8_t* packed, const uint8_t* scale, const float* global_scale, int64_t R,
                           int64_t K, bool nv, int elem_format, DType out_t, void* out, cudaStream_t stream) {
  const int64_t n_bytes = R * K / 2;
  dispatch_output(out_t, [&](auto tag) {
    using O = decltype(tag);
    dequantize_fp4_kernel<O><<<grid_for(n_bytes), kThreads, 0, stream>>>(
        packed, scale, global_scale, n_bytes, nv ? kNVBlock : kMXBlock, nv, minifloat_format(elem_format),
        elem_format == kE2M1, static_cast<O*>(out));
  });
}

}  // namespace cuda
}  // namespace qkernels
