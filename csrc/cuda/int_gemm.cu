// CUDA integer dequant-GEMMs: W4A16 (int4_weight_only_mm) and W8A16 (int8_weight_only_mm): the kernels. Host side
// (checks, path choice, cuBLAS, registration): int_gemm_ops.cpp; see launchers.h for why the two are split.
//
// Two paths, chosen per call (semantics: qkernels/reference/int_gemm.py; decode: qkernels/int_gemm.h):
//  * decode (M <= kMmaMaxM, fp16/bf16 x, K % 32 == 0, group_size % 32 == 0, 16-byte aligned operands): a
//    tensor-core kernel on mma.sync.m16n8k16 (sm80+). Weights are read from global memory once per 16-row tile of
//    x (so exactly once for M <= 16; each further tile, blockIdx.z, streams and decodes W again), in 16-byte loads,
//    and decoded in registers; split-K over blockIdx.y fills all SMs when M is small and partial
//    sums meet in an fp32 workspace through atomicAdd (so the summation order, not the math, varies run to run).
//  * everything else (large M, fp32 x, odd shapes): dequantize the weight into an x-dtype temporary [N, K] with a
//    simple elementwise kernel and call at::mm (cuBLAS). For large M the GEMM dominates and this stays within the
//    dequantization cost (~N*K*2 bytes written and read once) of cuBLAS bf16.
//
// The tensor-core kernel needs no shared memory and no ldmatrix: every thread loads its operands straight into
// mma fragments. The trick that makes that coalesced is a permutation of K inside each 128-wide K chunk, applied
// identically to x and W (a dot product does not care about the order of its terms):
//   thread (groupID g = lane / 4, t = lane % 4) owns the 32 consecutive k in [k0 + 32 t, k0 + 32 t + 32), for
//   weight row n = n_tile + g and x rows m = g and g + 8; mma step j (0..7) feeds it elements 4j .. 4j + 3 of that
//   slice, which the fragment layout calls logical k = {2t, 2t+1} (a0/a1, b0/b1) and {2t+8, 2t+9} (a4/a5, b2/b3).
// Each logical k of a step is thus owned by the same t in the A and the B fragment, so A and B see the same
// permutation, and over j = 0..7 and t = 0..3 every k of the chunk is used once.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "convert.cuh"
#include "launchers.h"
#include "qkernels/int_gemm.h"

namespace qkernels {
namespace cuda {
namespace {

constexpr int kWarps = 4;            // warps per block
constexpr int kNTiles = 4;           // n-tiles of 8 weight rows per warp (x fragments are reused across them)
constexpr int kChunkK = 128;         // K per warp iteration: 4 threads x 32 consecutive k
constexpr int kRowsPerBlock = kWarps * kNTiles * 8;
constexpr int kDirectWarps = 2;   // direct kernel: warps per block, 8 weight rows each
constexpr int kDirectUnroll = 8;  // direct kernel: K chunks whose weight loads are in flight together per thread

// ---- mma.sync fragments -------------------------------------------------------------------------------------

template <typename T>
struct Frag;

template <>
struct Frag<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // lo -> low 16 bits (the smaller k), as the fragment layout wants
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

template <>
struct Frag<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

// Weight operand of one thread for one n-tile and one K chunk: its 32 k of row n, decoded on demand per mma step.
// W4: 16 bytes of nibbles; scale/zero of the (single) group those 32 k lie in (group_size % 32 == 0).
struct W4Slice {
  uint4 raw;
  float scale, zz;
  __device__ __forceinline__ void load(const uint8_t* w, const float* scale_p, const int32_t* zp, bool is_signed,
                                       int64_t n, int64_t k, int64_t K, int64_t G, int64_t group_size, bool valid) {
    if (valid) {
      raw = *reinterpret_cast<const uint4*>(w + n * (K / 2) + k / 2);
      const int64_t g = n * G + k / group_size;
      scale = scale_p[g];
      zz = int4_biased_zero(zp != nullptr ? zp[g] : 0, is_signed);
      if (is_signed) {
        raw.x = int4_word_to_fields(raw.x, true);
        raw.y = int4_word_to_fields(raw.y, true);
        raw.z = int4_word_to_fields(raw.z, true);
        raw.w = int4_word_to_fields(raw.w, true);
      }
    } else {
      raw = make_uint4(0, 0, 0, 0);
      scale = 0.f;  // decodes to exact zeros
      zz = kTwo23;
    }
  }
  // elements 4j .. 4j+3 of the slice as two packed pairs (b0,b1), (b2,b3)
  template <typename T>
  __device__ __forceinline__ void step(int j, uint32_t b[2]) const {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    const uint32_t f = words[j >> 1];
    const int e = (j & 1) * 4;
    b[0] = Frag<T>::pack(dequant_int4_field(int4_field(f, e + 0), scale, zz),
                         dequant_int4_field(int4_field(f, e + 1), scale, zz));
    b[1] = Frag<T>::pack(dequant_int4_field(int4_field(f, e + 2), scale, zz),
                         dequant_int4_field(int4_field(f, e + 3), scale, zz));
  }
};

// W8: 32 bytes of int8 codes; the per-row scale is applied to the fp32 accumulator in the epilogue, so the
// operand is q itself, exact in fp16/bf16.
struct W8Slice {
  uint4 raw[2];
  __device__ __forceinline__ void load(const int8_t* w, int64_t n, int64_t k, int64_t K, bool valid) {
    if (valid) {
      const uint4* p = reinterpret_cast<const uint4*>(w + n * K + k);
      raw[0] = p[0];
      raw[1] = p[1];
    } else {
      raw[0] = make_uint4(0, 0, 0, 0);  // code 0 decodes to 0
      raw[1] = raw[0];
    }
  }
  template <typename T>
  __device__ __forceinline__ void step(int j, uint32_t b[2]) const {
    const uint32_t words[8] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w, raw[1].x, raw[1].y, raw[1].z, raw[1].w};
    const uint32_t f = words[j];  // elements 4j .. 4j+3 = bytes 0..3 of word j
    b[0] = Frag<T>::pack(int8_field_value(int8_field(f, 0)), int8_field_value(int8_field(f, 1)));
    b[1] = Frag<T>::pack(int8_field_value(int8_field(f, 2)), int8_field_value(int8_field(f, 3)));
  }
};

// x rows m (r = 0) and m + 8 (r = 1) of a 16-row tile: the thread's 32 consecutive k, 16 words of two halves.
template <typename T>
__device__ __forceinline__ void load_x(const T* x, int64_t M, int64_t K, int64_t m, int64_t k, bool kvalid,
                                       uint32_t xa[16]) {
  if (kvalid && m < M) {
    const uint4* p = reinterpret_cast<const uint4*>(x + m * K + k);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 v = p[q];
      xa[4 * q + 0] = v.x;
      xa[4 * q + 1] = v.y;
      xa[4 * q + 2] = v.z;
      xa[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) xa[i] = 0u;
  }
}

// A operand of one K chunk: x rows m and m + 8 of the 16-row tile, this thread's 32 consecutive k; frag(j) is the
// mma step j fragment: a0a1 = (row g, logical k 2t..2t+1) = slice elements 4j, 4j+1 = word 2j; a4a5 = 4j+2, 4j+3.
template <typename T>
struct XTile {
  uint32_t lo[16], hi[16];
  __device__ __forceinline__ void load(const T* x, int64_t M, int64_t K, int64_t m, int64_t k, bool kvalid) {
    load_x(x, M, K, m, k, kvalid, lo);
    load_x(x, M, K, m + 8, k, kvalid, hi);
  }
  __device__ __forceinline__ void frag(int j, uint32_t a[4]) const {
    a[0] = lo[2 * j];
    a[1] = hi[2 * j];
    a[2] = lo[2 * j + 1];
    a[3] = hi[2 * j + 1];
  }
};

// B operand slice of weight row n for the chunk at k (zeros where !valid), W4 or W8.
template <bool kW4>
using SliceOf = typename std::conditional<kW4, W4Slice, W8Slice>::type;

template <bool kW4>
__device__ __forceinline__ void load_slice(SliceOf<kW4>& s, const uint8_t* w, const float* scale, const int32_t* zp,
                                           bool is_signed, int64_t n, int64_t k, int64_t K, int64_t G,
                                           int64_t group_size, bool valid) {
  if constexpr (kW4) {
    s.load(w, scale, zp, is_signed, n, k, K, G, group_size, valid);
  } else {
    s.load(reinterpret_cast<const int8_t*>(w), n, k, K, valid);
  }
}

// out_acc[m, n] += x[m, :] . W[n, :] over this block's K chunks (fp32, atomically). Grid: (ceil(N / 128) blocks
// of 4 warps x 32 rows, K splits, ceil(M / 16) row tiles).
template <typename T, bool kW4>
__global__ void __launch_bounds__(kWarps * 32)
    weight_only_mma_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ scale,
                           const int32_t* __restrict__ zp, bool is_signed, int64_t M, int64_t N, int64_t K,
                           int64_t group_size, int64_t chunks_per_split, float* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n_base = ((int64_t)blockIdx.x * kWarps + warp) * (kNTiles * 8);
  if (n_base >= N) return;  // whole warp leaves; the kernel has no block-level synchronisation
  const int64_t m_base = (int64_t)blockIdx.z * 16;
  const int64_t nchunks = (K + kChunkK - 1) / kChunkK;
  const int64_t c_begin = (int64_t)blockIdx.y * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < nchunks ? c_begin + chunks_per_split : nchunks;
  const int64_t G = K / group_size;

  float acc[kNTiles][4];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t k = c * kChunkK + t * 32;
    const bool kvalid = k < K;  // K % 32 == 0, so a slice is either wholly inside K or wholly outside
    // all weight loads of the chunk first: kNTiles independent 16/32-byte loads in flight per thread
    SliceOf<kW4> ws[kNTiles];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const int64_t n = n_base + nt * 8 + g;
      load_slice<kW4>(ws[nt], w, scale, zp, is_signed, n, k, K, G, group_size, kvalid && n < N);
    }
    XTile<T> xt;
    xt.load(x, M, K, m_base + g, k, kvalid);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint32_t a[4];
      xt.frag(j, a);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        uint32_t b[2];
        ws[nt].template step<T>(j, b);
        Frag<T>::mma(acc[nt], a, b);
      }
    }
  }

  // C fragment: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at (row g + 8, same cols)
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m_base + g + (i >= 2 ? 8 : 0);
      const int64_t n = n_base + nt * 8 + 2 * t + (i & 1);
      if (m < M && n < N) {
        const float v = kW4 ? acc[nt][i] : acc[nt][i] * scale[n];
        atomicAdd(out + m * N + n, v);
      }
    }
  }
#endif
}

// The "direct" decode kernel: one warp per 8 weight rows over ALL of K, so there is no split-K, no fp32 workspace to
// zero, no atomics and no conversion pass: the call is one launch that writes x's dtype (the split-K kernel above
// costs three: memset, kernel, fp32 -> dtype, which at decode sizes is more than the ~3 us the weights take to
// stream at full HBM bandwidth). Parallelism comes from N instead of K, so the host takes it only when there are at
// least as many blocks as SMs (int_gemm_ops.cpp). Memory-level parallelism per thread comes from issuing the weight
// loads of kDirectUnroll chunks before decoding any of them. Same fragment layout and K permutation as above.
template <typename T, bool kW4>
__global__ void __launch_bounds__(kDirectWarps * 32)
    weight_only_mma_direct_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                  const float* __restrict__ scale, const int32_t* __restrict__ zp, bool is_signed,
                                  int64_t M, int64_t N, int64_t K, int64_t group_size, T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n_base = ((int64_t)blockIdx.x * kDirectWarps + warp) * 8;
  if (n_base >= N) return;  // whole warp leaves; no block-level synchronisation
  const int64_t m_base = (int64_t)blockIdx.z * 16;
  const int64_t nchunks = (K + kChunkK - 1) / kChunkK;
  const int64_t G = K / group_size;
  const int64_t n = n_base + g;  // the weight row this thread loads (B fragment column g)

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t c0 = 0; c0 < nchunks; c0 += kDirectUnroll) {
    SliceOf<kW4> ws[kDirectUnroll];
#pragma unroll
    for (int u = 0; u < kDirectUnroll; ++u) {
      const int64_t k = (c0 + u) * kChunkK + t * 32;
      // K % 32 == 0: a slice is wholly inside K or wholly outside
      load_slice<kW4>(ws[u], w, scale, zp, is_signed, n, k, K, G, group_size, k < K && n < N);
    }
#pragma unroll
    for (int u = 0; u < kDirectUnroll; ++u) {
      const int64_t k = (c0 + u) * kChunkK + t * 32;
      XTile<T> xt;
      xt.load(x, M, K, m_base + g, k, k < K);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t a[4];
        xt.frag(j, a);
        uint32_t b[2];
        ws[u].template step<T>(j, b);
        Frag<T>::mma(acc, a, b);
      }
    }
  }

  // C fragment: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at (row g + 8, same cols)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m_base + g + (i >= 2 ? 8 : 0);
    const int64_t col = n_base + 2 * t + (i & 1);
    if (m < M && col < N) out[m * N + col] = from_f32<T>(kW4 ? acc[i] : acc[i] * scale[col]);
  }
#endif
}

// W4 -> x-dtype weight [N, K] for the cuBLAS path: one thread per packed byte, any group_size dividing K.
template <typename T>
__global__ void dequant_int4_kernel(const uint8_t* __restrict__ w, const float* __restrict__ scale,
                                    const int32_t* __restrict__ zp, bool is_signed, int64_t N, int64_t K,
                                    int64_t group_size, T* __restrict__ out) {
  const int64_t half_k = K / 2;
  const int64_t total = N * half_k;
  const int64_t G = K / group_size;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / half_k, k = (i % half_k) * 2;
    const uint32_t fields = int4_word_to_fields(w[i], is_signed);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t gi = n * G + (k + e) / group_size;
      const float zz = int4_biased_zero(zp != nullptr ? zp[gi] : 0, is_signed);
      out[n * K + k + e] = from_f32<T>(dequant_int4_field(int4_field(fields, e), scale[gi], zz));
    }
  }
}

}  // namespace

bool weight_only_mma_direct_fills(int64_t M, int64_t N, int num_sms) {
  const int64_t rows = kDirectWarps * 8;
  return ((N + rows - 1) / rows) * ((M + 15) / 16) >= num_sms;
}

void launch_weight_only_mma_direct(DType xt, bool w4, const void* x, const uint8_t* w, const float* scale,
                                   const int32_t* zp, bool is_signed, int64_t M, int64_t N, int64_t K,
                                   int64_t group_size, void* out, cudaStream_t stream) {
  const int64_t rows = kDirectWarps * 8;
  const dim3 grid((unsigned)((N + rows - 1) / rows), 1, (unsigned)((M + 15) / 16));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    if (w4) {
      weight_only_mma_direct_kernel<T, true><<<grid, kDirectWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), w, scale, zp, is_signed, M, N, K, group_size, static_cast<T*>(out));
    } else {
      weight_only_mma_direct_kernel<T, false><<<grid, kDirectWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), w, scale, zp, is_signed, M, N, K, group_size, static_cast<T*>(out));
    }
  };
  if (xt == DType::kHalf) {
    go(__half{});
  } else {
    go(__nv_bfloat16{});
  }
}

void launch_weight_only_mma(DType xt, bool w4, const void* x, const uint8_t* w, const float* scale, const int32_t* zp,
                            bool is_signed, int64_t M, int64_t N, int64_t K, int64_t group_size, int num_sms,
                            float* out_acc, cudaStream_t stream) {
  const int64_t nchunks = (K + kChunkK - 1) / kChunkK;
  const int64_t blocks_n = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t m_tiles = (M + 15) / 16;
  // split K until there are ~4 blocks (of 4 warps) per SM, never below one chunk per split
  const int64_t target = 4LL * num_sms;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(nchunks, target / std::max<int64_t>(1, blocks_n * m_tiles)));
  const int64_t per_split = (nchunks + splits - 1) / splits;
  splits = (nchunks + per_split - 1) / per_split;
  const dim3 grid((unsigned)blocks_n, (unsigned)splits, (unsigned)m_tiles);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    if (w4) {
      weight_only_mma_kernel<T, true><<<grid, kWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), w, scale, zp, is_signed, M, N, K, group_size, per_split, out_acc);
    } else {
      weight_only_mma_kernel<T, false><<<grid, kWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), w, scale, zp, is_signed, M, N, K, group_size, per_split, out_acc);
    }
  };
  if (xt == DType::kHalf) {
    go(__half{});
  } else {
    go(__nv_bfloat16{});
  }
}

void launch_dequant_int4(DType out_t, const uint8_t* w, const float* scale, const int32_t* zp, bool is_signed,
                         int64_t N, int64_t K, int64_t group_size, void* out, cudaStream_t stream) {
  const int threads = 256;
  const int64_t total = N * (K / 2);
  const unsigned blocks = (unsigned)std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 1 << 20));
  switch (out_t) {
    case DType::kHalf:
      dequant_int4_kernel<__half><<<blocks, threads, 0, stream>>>(w, scale, zp, is_signed, N, K, group_size,
                                                                  static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      dequant_int4_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(w, scale, zp, is_signed, N, K, group_size,
                                                                         static_cast<__nv_bfloat16*>(out));
      break;
    default:
      dequant_int4_kernel<float><<<blocks, threads, 0, stream>>>(w, scale, zp, is_signed, N, K, group_size,
                                                                 static_cast<float*>(out));
      break;
  }
}

}  // namespace cuda
}  // namespace qkernels
