// CPU integer dequant-GEMMs: W4A16, W8A16 and W8A8 (dynamic per-token int8 activations).
//
// Two strategies, chosen per call:
//  * small M (decode) on AVX2 machines: the register micro-kernels of int_gemm_avx2.cpp, parallel over N (each
//    thread one contiguous range of rows). Weights are read once and decoded in registers; nothing else touches the
//    weight-sized arrays (zero points are read and range-checked inside the kernel), so the per-call overhead is the
//    O(M * K) preparation of x.
//  * everything else (large M, unaligned K or groups, no AVX2): dequantize a block of weight rows into an L2-sized
//    fp32 tile and hand it to the BLAS sgemm behind at::mm; the dequant cost is amortised over the M rows.
// The semantics are those of qkernels/reference/int_gemm.py; per-element decode comes from qkernels/int_quant.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"
#include "int_gemm_kernels.h"
#include "row_guard.h"
#include "qkernels/check.h"
#include "qkernels/int_checks.h"
#include "qkernels/int_gemm.h"
#include "qkernels/int_quant.h"

namespace qkernels {
namespace {

using cpu::for_n_ranges;
using cpu::i16_block;
using cpu::prepare_x_i16;
using cpu::use_i16;
using cpu::kRowBlock;
using cpu::use_avx2;

// Beyond this many rows of x the dequantize-tile + sgemm path wins (measured with benchmarks.bench_cpu_gemm on a
// 2-core Zen 3: the register kernel re-decodes weights every 4 rows; crossover at M ~ 24-32).
// QKERNELS_CPU_SMALL_M overrides it for tuning experiments.
int64_t small_m_threshold() {
  static const int64_t v = [] {
    const char* e = std::getenv("QKERNELS_CPU_SMALL_M");
    return e ? std::atoll(e) : (int64_t)24;
  }();
  return v;
}
// QKERNELS_CPU_W4_K64=0 keeps the int4 decode kernel on the 32-k decode where the 64-k mask decode would run, so
// tests cover both kernels on the same shapes and benchmarks can compare them in one run. Read per call.
bool use_w4_k64() {
  const char* e = std::getenv("QKERNELS_CPU_W4_K64");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// Rows of W per dequantized tile: 32 x 4096 fp32 = 512 KiB, about one L2.
constexpr int64_t kTileN = 32;
// Parallel over N in tiles; f(n0, n1) handles weight rows [n0, n1).
template <typename F>
void for_n_tiles(int64_t N, int64_t tile, const F& f) {
  at::parallel_for(0, (N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t * tile, std::min(N, (t + 1) * tile));
  });
}

// int8 effective zero points zz = zero_point (+8 for signed codes, whose nibbles the kernels XOR with 8 to make
// them value + 8), range-checked; without zero points, the constant 8 / 0.
at::Tensor int4_effective_zero_points(const std::optional<at::Tensor>& zero_point, int64_t N, int64_t G,
                                      bool is_signed, const at::TensorOptions& opts) {
  if (!zero_point.has_value()) return at::full({N, G}, is_signed ? 8 : 0, opts.dtype(at::kChar));
  // one pass builds the int8 effective zero points and range-checks them (an ATen add + aminmax cost ~50 us)
  auto zc = zero_point->contiguous();
  auto zz = at::empty({N, G}, opts.dtype(at::kChar));
  const int32_t* zp = zc.data_ptr<int32_t>();
  int8_t* zo = zz.data_ptr<int8_t>();
  int32_t zmin = N * G > 0 ? zp[0] : 0, zmax = zmin;
  for (int64_t i = 0; i < N * G; ++i) {
    zmin = std::min(zmin, zp[i]);
    zmax = std::max(zmax, zp[i]);
    zo[i] = (int8_t)(zp[i] + (is_signed ? 8 : 0));
  }
  TORCH_CHECK(zmin >= -8 && zmax <= 16, "zero_point values must be in [-8, 16] for int4 weights, got [", zmin, ", ",
              zmax, "]");
  return zz;
}

// x [M, K] (any float dtype) -> what the AVX2 int4 kernel reads: x' = x * 2^-(E_m + 28) in fp32, E_m the binary
// exponent of the row's largest |x| (clamped to +-100), with each 16-block permuted to (8 evens, 8 odds), the order
// in which the kernel decodes nibbles; the per-group sums of x' (accumulated in double, then rounded once); and the
// per-row factors 2^E_m that undo the scaling. The kernel's codes carry a factor 2^28 (q * 2^28 from the top bits of
// int32 lanes), so x'-products equal x-products; scaling each row to a largest |x'| near 2^-28 keeps every product
// and sum far from fp32 overflow and underflow, and as powers of two the factors are exact.
//
// k64 = true: the layout of the 64-k mask-decode kernel (w4a16_rows_avx2_k64) instead: per 64-block
// x'[8 j + l] = x[8 l + j] * 2^-E * 2^-4j (j < 7; 2^-E alone for j = 7), matching its codes u * 2^4j; the largest
// |x'| is then near 1 (j = 7) down to 2^-24 (j = 6), as far from fp32's limits as the 2^-28 above.
//
// The three arrays go to the calling thread's scratch (cpu_dispatch.h; the int16 path's slots, which a call uses
// either for this or for its int16 activations, never both): three at::empty per call were ~1 us of a decode-sized
// call's fixed cost.
struct XF32 {
  const float* xp;
  const float* xsum;
  const float* row_scale;
};
XF32 int4_prepare_x(const at::Tensor& x, int64_t group_size, bool k64 = false) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size;
  const c10::MaybeOwned<at::Tensor> xc = x.expect_contiguous();
  float* dst = cpu::thread_scratch<float>(cpu::kScratchXq, M * K);
  float* sums = cpu::thread_scratch<float>(cpu::kScratchXsum, M * G);
  float* rs = cpu::thread_scratch<float>(cpu::kScratchXs, M);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int4_prepare_x", [&] {
    const scalar_t* src = xc->data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* row = src + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(row[k])));
      // NaN/inf rows keep E = 0: their outputs stay NaN/inf as in the reference
      const int e = (amax > 0.f && std::isfinite(amax)) ? std::clamp(std::ilogb(amax), -100, 100) : 0;
      const float down = std::ldexp(1.f, -e), bits = std::ldexp(1.f, -28);
      rs[m] = std::ldexp(1.f, e);
      float* prow = dst + m * K;
      if (k64) {
        float f[8];
        for (int j = 0; j < 8; ++j) f[j] = down * std::ldexp(1.f, j == 7 ? 0 : -4 * j);
        for (int64_t b = 0; b < K; b += 64)
          for (int64_t j = 0; j < 8; ++j)
            for (int64_t l = 0; l < 8; ++l) prow[b + 8 * j + l] = static_cast<float>(row[b + 8 * l + j]) * f[j];
      } else {
        for (int64_t b = 0; b < K; b += 16)
          for (int64_t j = 0; j < 8; ++j) {
            prow[b + j] = static_cast<float>(row[b + 2 * j]) * down * bits;
            prow[b + 8 + j] = static_cast<float>(row[b + 2 * j + 1]) * down * bits;
          }
      }
      for (int64_t g = 0; g < G; ++g) {
        double acc = 0.0;
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) acc += static_cast<float>(row[k]);
        sums[m * G + g] = (float)(acc * (double)down);
      }
    }
  });
  return {dst, sums, rs};
}

// Generic path: dequantize rows [n0, n1) with `decode_row(n, dst)` into a tile, then out[:, n0:n1] = x @ tile^T.
template <typename Decode>
void tiled_dequant_mm(const at::Tensor& xf, int64_t N, int64_t K, at::Tensor& out, const Decode& decode_row) {
  for_n_tiles(N, kTileN, [&](int64_t n0, int64_t n1) {
    auto tile = at::empty({n1 - n0, K}, xf.options());
    float* t = tile.data_ptr<float>();
    for (int64_t n = n0; n < n1; ++n) decode_row(n, t + (n - n0) * K);
    out.narrow(1, n0, n1 - n0).copy_(at::mm(xf, tile.t()));
  });
}

// The output of one GEMM call: `out` in x's dtype, and the fp32 [M, N] that the kernels and the row guard write:
// out itself for fp32 x, else the calling thread's scratch, converted into out once at the end (result()). This
// replaces an fp32 at::empty plus `.to(dtype)` (another allocation and a dispatched copy) per call; on AVX2 CPUs the
// conversion rounds as ATen's does (f32_to_half_avx2), elsewhere it is ATen's copy_, so the bits are those of
// `out_fp32.to(dtype)` either way.
class F32Out {
 public:
  F32Out(const at::Tensor& x, int64_t M, int64_t N)
      : out_(at::empty({M, N}, x.options())), M_(M), N_(N), direct_(x.scalar_type() == at::kFloat) {
    f_ = direct_ ? out_.data_ptr<float>() : cpu::thread_scratch<float>(cpu::kScratchOut, M * N);
  }
  float* data() const { return f_; }
  // the fp32 buffer as a tensor, for the paths that write it through ATen (tiles + at::mm)
  at::Tensor tensor() const {
    return direct_ ? out_ : at::from_blob(f_, {M_, N_}, out_.options().dtype(at::kFloat));
  }
  at::Tensor result(bool avx2) {
    if (direct_) return out_;
    const auto dt = out_.scalar_type();
    if (avx2 && (dt == at::kBFloat16 || dt == at::kHalf)) {
      cpu::f32_to_half_avx2(f_, reinterpret_cast<uint16_t*>(out_.data_ptr()), M_ * N_, dt == at::kBFloat16);
    } else {
      out_.copy_(tensor());
    }
    return out_;
  }

 private:
  at::Tensor out_;
  int64_t M_, N_;
  bool direct_;
  float* f_;
};

// scale as fp32 contiguous without a dispatched no-op `.to()` / `.contiguous()` when it already is (the layers'
// buffers are)
at::Tensor float_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// x @ dequant(W)^T in double for the row guard's repairs, W decoded as the reference decodes it: the fp32 product
// scale * (q - zero_point), then exact in double. x holds Kx <= K columns (the rest count as zeros).
struct Int4ExactRow {
  const uint8_t* w;
  const float* s;
  const int32_t* zp;  // nullptr: 0
  int64_t K, Kx, group_size;
  bool is_signed;
  double operator()(const double* xr, int64_t n) const {
    const int64_t G = K / group_size;
    const uint8_t* row = w + n * (K / 2);
    double acc = 0.0;
    for (int64_t g = 0; g < G; ++g) {
      const float sg = s[n * G + g];
      const int32_t z = zp ? zp[n * G + g] : 0;
      for (int64_t k = g * group_size; k < std::min((g + 1) * group_size, Kx); ++k) {
        const int32_t nib = (row[k >> 1] >> (4 * (k & 1))) & 0xF;
        const int32_t q = is_signed ? (nib ^ 8) - 8 : nib;
        acc += xr[k] * (double)(sg * (float)(q - z));
      }
    }
    return acc;
  }
};

// An int4 GEMM's weight operands as the kernels read them: fp32 contiguous scales, contiguous codes and zero points
// (the tensors are kept alive by the members).
struct Int4Weight {
  at::Tensor sf;
  c10::MaybeOwned<at::Tensor> wc, zc;
  const float* s;
  const uint8_t* w;
  const int32_t* zp = nullptr;
  Int4Weight(const at::Tensor& packed_w, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point)
      : sf(float_contiguous(scale)), wc(packed_w.expect_contiguous()), s(sf.data_ptr<float>()),
        w(wc->data_ptr<uint8_t>()) {
    if (zero_point.has_value()) {
      zc = zero_point->expect_contiguous();
      zp = zc->data_ptr<int32_t>();
    }
  }
};

// The result of an int4 GEMM with no products (M, N or K zero): zeros when K = 0, else an empty tensor; zero points
// are range-checked all the same.
at::Tensor int4_mm_empty(const at::Tensor& x, const std::optional<at::Tensor>& zero_point, int64_t M, int64_t N,
                         int64_t K, int64_t G, bool is_signed) {
  if (zero_point.has_value()) int4_effective_zero_points(zero_point, N, G, is_signed, x.options());
  auto out = at::empty({M, N}, x.options());
  return K == 0 ? out.zero_() : out;
}

at::Tensor int4_weight_only_mm_cpu(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& zero_point, int64_t group_size, bool is_signed) {
  // x may hold Kx < K columns (a ragged last group, stored padded: int_checks.h); the missing ones are zeros
  check_int4_mm_args(x, packed_w, scale, zero_point, group_size, /*allow_ragged_x=*/true);
  const int64_t M = x.size(0), Kx = x.size(1), K = packed_w.size(1) * 2, N = packed_w.size(0);
  const int64_t G = K / group_size;
  const bool avx2 = use_avx2();
  if (M == 0 || N == 0 || K == 0) return int4_mm_empty(x, zero_point, M, N, K, G, is_signed);
  F32Out out(x, M, N);
  const Int4Weight iw(packed_w, scale, zero_point);
  const float* s = iw.s;
  const uint8_t* w = iw.w;
  const int32_t* zp = iw.zp;
  // x's extreme rows go to the kernels rescaled, and outputs they could not get right are recomputed (row_guard.h)
  const cpu::RowGuard guard(x);
  const at::Tensor xk = guard.rescaled() ? guard.rescaled_x() : x;
  float* o = out.data();
  // a ragged x with zero columns up to K, made on first use: the int16 path writes those zeros into its scratch
  // itself (no copy of x) where Kx % 8 == 0
  at::Tensor xpad;
  auto padded = [&]() -> const at::Tensor& {
    if (!xpad.defined()) xpad = Kx == K ? xk : at::constant_pad_nd(xk, {0, K - Kx}, 0);
    return xpad;
  };

  if (avx2 && M <= small_m_threshold() && K % 32 == 0 && group_size % 32 == 0) {
    // the 64-k mask-decode kernel where the shape allows it, else the 32-k one (group_size 32, K = 64 n + 32)
    const bool k64 = K % 64 == 0 && group_size % 64 == 0 && use_w4_k64();
    // the k steps that meet x's own columns: a ragged x's steps past them multiply zeros and are skipped (for
    // K = 576 stored as 640 with group 128, the last 64-k step of every row: 10% of the decode work)
    const int64_t step = k64 ? 64 : 32, kend = std::min(K, (Kx + step - 1) / step * step);
    // bf16/fp16 x: the int16-activation kernel (k64 layout only), unless x holds NaN/inf; else the fp32 kernels
    cpu::XI16 xi{};
    XF32 xf{};
    const bool i16 =
        k64 && use_i16(x) && cpu::prepare_x_i16_scratch(Kx % 8 == 0 ? xk : padded(), K, group_size, true, xi);
    if (!i16) xf = int4_prepare_x(padded(), group_size, k64);
    const int64_t F = i16_block(group_size);
    std::atomic<bool> bad{false};
    for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) {
      bool b;
      if (i16) {
        b = cpu::w4a16_rows_avx2_i16(xi.xq, M, xi.xs, xi.xsum, w, s, zp, is_signed, K, kend, group_size, F, o, N, n0,
                                     n1);
      } else {
        const float *xpp = xf.xp, *rs = xf.row_scale, *xs = xf.xsum;
        b = k64 ? cpu::w4a16_rows_avx2_k64(xpp, M, xs, rs, w, s, zp, is_signed, K, kend, group_size, o, N, n0, n1)
                : cpu::w4a16_rows_avx2(xpp, M, xs, rs, w, s, zp, is_signed, K, kend, group_size, o, N, n0, n1);
      }
      if (b) bad = true;
    });
    if (bad) int4_effective_zero_points(zero_point, N, G, is_signed, x.options());  // raises with the range
  } else {
    auto xf = padded().to(at::kFloat).contiguous();
    at::Tensor ot = out.tensor();
    // zz = zero_point (+8 for signed codes), int8, range-checked
    const at::Tensor zz = int4_effective_zero_points(zero_point, N, G, is_signed, x.options());
    const int8_t* z = zz.data_ptr<int8_t>();
    if (avx2 && K % 32 == 0 && group_size % 32 == 0) {
      const uint8_t mask = is_signed ? 0x88 : 0x00;
      tiled_dequant_mm(xf, N, K, ot, [&](int64_t n, float* dst) {
        cpu::w4_dequant_rows_avx2(w, s, z, K, group_size, mask, dst, n, n + 1);
      });
    } else {
      // the decode of the CUDA kernels (qkernels/int_gemm.h), so CPU tests check the GPU's per-element math
      tiled_dequant_mm(xf, N, K, ot, [&](int64_t n, float* dst) {
        const uint8_t* row = w + n * (K / 2);
        for (int64_t g = 0; g < G; ++g) {
          const float sg = s[n * G + g];
          const float zz = int4_biased_zero((int32_t)z[n * G + g] - (is_signed ? 8 : 0), is_signed);
          // group_size may be odd, so walk elements and pick the nibble by parity
          for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
            const uint32_t fields = int4_word_to_fields(row[k >> 1], is_signed);
            dst[k] = dequant_int4_field(int4_field(fields, (int)(k & 1)), sg, zz);
          }
        }
      });
    }
  }
  guard.finish(o, N, Int4ExactRow{w, s, zp, K, Kx, group_size, is_signed});
  return out.result(avx2);
}

// ---- W4A8: int8_dynamic_int4_mm (int8 activations per row and weight group, int4 weights) ----
//
// x [M, Kx] zero-padded to K -> the activations of int8_dynamic_int4_mm, as the specification makes them
// (qkernels/reference/int_gemm.py, quantize_per_group_int8): per row and weight group, scale = amax / 127 (1 for an
// all-zero group) and codes round_half_even(x / scale) clamped to [-127, 127]; a row holding NaN or inf gets codes 0
// and scale NaN in every group (its outputs are NaN). q: codes, per 64-block the 32 even elements then the 32 odd
// ones when `permute` (the order in which w4q8_tile decodes nibbles), else natural order; xs [M, G]; xsum [M, G] =
// xs * the group's code sum. A true division per element, as the reference divides (x * (1 / s) can round a code
// differently). Returns whether every row was finite.
template <typename T>
bool quantize_x_per_group_i8(const T* x, int64_t M, int64_t Kx, int64_t K, int64_t group_size, bool permute,
                             int8_t* q, float* xs, float* xsum) {
  const int64_t G = K / group_size;
  bool all_finite = true;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * Kx;
    int8_t* qr = q + m * K;
    bool finite = true;
    for (int64_t k = 0; k < Kx; ++k) finite &= std::isfinite(static_cast<float>(row[k]));
    all_finite &= finite;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group_size, k1 = std::min(k0 + group_size, Kx);
      float amax = 0.f;
      if (finite)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(static_cast<float>(row[k])));
      float sc = amax / 127.f;
      sc = sc > 0.f ? sc : 1.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k0 + group_size; ++k) {
        const int8_t c = (finite && k < k1)
                             ? (int8_t)clampf(round_half_even(static_cast<float>(row[k]) / sc), -127.f, 127.f)
                             : (int8_t)0;
        sum += c;
        const int64_t j = k & 63;
        qr[permute ? (k - j) + (j & 1) * 32 + (j >> 1) : k] = c;
      }
      xs[m * G + g] = finite ? sc : std::nanf("");
      xsum[m * G + g] = finite ? sc * (float)sum : std::nanf("");
    }
  }
  return all_finite;
}

at::Tensor int8_dynamic_int4_mm_cpu(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& zero_point, int64_t group_size, bool is_signed) {
  check_int4_mm_args(x, packed_w, scale, zero_point, group_size, /*allow_ragged_x=*/true);
  const int64_t M = x.size(0), Kx = x.size(1), K = packed_w.size(1) * 2, N = packed_w.size(0);
  const int64_t G = K / group_size;
  TORCH_CHECK(group_size < (1 << 17), "int8_dynamic_int4_mm: group_size=", group_size,
              " is too large for exact int32 sums of a group (needs < 131072)");
  if (M == 0 || N == 0 || K == 0) return int4_mm_empty(x, zero_point, M, N, K, G, is_signed);
  const bool avx2 = use_avx2();
  const c10::MaybeOwned<at::Tensor> xc = x.expect_contiguous();
  const bool fast = avx2 && M <= small_m_threshold() && K % 64 == 0 && group_size % 64 == 0;
  // the codes in the calling thread's scratch for the register kernel; a tensor for the composite path
  at::Tensor qt, st, sumt;
  int8_t* xq;
  float *xs, *xsum;
  if (fast) {
    xq = cpu::thread_scratch<int8_t>(cpu::kScratchXq, M * K);
    xs = cpu::thread_scratch<float>(cpu::kScratchXs, M * G);
    xsum = cpu::thread_scratch<float>(cpu::kScratchXsum, M * G);
  } else {
    qt = at::empty({M, K}, x.options().dtype(at::kChar));
    st = at::empty({M, G}, x.options().dtype(at::kFloat));
    sumt = at::empty({M, G}, x.options().dtype(at::kFloat));
    xq = qt.data_ptr<int8_t>();
    xs = st.data_ptr<float>();
    xsum = sumt.data_ptr<float>();
  }
  // the activations (the register kernel's order when fast, else natural): vectorized where x's width allows (the scalar loop's nearbyint is a libm
  // call per element: ~8 us of a 1536-wide row); a row with NaN / inf sends the call to the scalar loop, which
  // gives such rows codes 0 and scale NaN
  const at::ScalarType xt = x.scalar_type();
  const bool vec = avx2 && group_size % 64 == 0 && Kx % 8 == 0 &&
                   (xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf) &&
                   cpu::i8_quantize_rows_avx2(xc->data_ptr(), xt == at::kBFloat16 ? cpu::kXBF16
                                                              : xt == at::kHalf   ? cpu::kXF16
                                                                                  : cpu::kXF32,
                                              Kx, M, K, group_size, fast, xq, xs, xsum);
  if (!vec) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "int8_dynamic_int4_mm", [&] {
      quantize_x_per_group_i8(xc->data_ptr<scalar_t>(), M, Kx, K, group_size, fast, xq, xs, xsum);
    });
  }
  if (!fast) {
    // large M, a shape the register kernel does not take, or no AVX2: the int4 GEMM of the dequantized activations
    // (xq * xs, one fp32 product each), which is the specification up to fp32 rounding
    const at::Tensor xd = (qt.to(at::kFloat).view({M, G, group_size}) * st.unsqueeze(-1)).view({M, K});
    return int4_weight_only_mm_cpu(xd, packed_w, scale, zero_point, group_size, is_signed).to(x.scalar_type());
  }
  F32Out out(x, M, N);
  const Int4Weight iw(packed_w, scale, zero_point);
  const float* s = iw.s;
  const uint8_t* w = iw.w;
  const int32_t* zp = iw.zp;
  // a ragged x's steps past its own columns hold zero codes: skipped
  const int64_t kend = std::min(K, (Kx + 63) / 64 * 64);
  float* o = out.data();
  std::atomic<bool> bad{false};
  for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) {
    if (cpu::w4a8_rows_avx2(xq, M, xs, xsum, w, s, zp, is_signed, K, kend, group_size, o, N, n0, n1)) bad = true;
  });
  if (bad) int4_effective_zero_points(zero_point, N, G, is_signed, x.options());  // raises with the range
  return out.result(avx2);
}

at::Tensor int8_weight_only_mm_cpu(const at::Tensor& x, const at::Tensor& q_w, const at::Tensor& scale) {
  check_int8_mm_args(x, q_w, scale, "scale");
  const int64_t M = x.size(0), K = x.size(1), N = q_w.size(0);
  if (M == 0 || N == 0 || K == 0) {
    auto out = at::empty({M, N}, x.options());
    return K == 0 ? out.zero_() : out;
  }
  F32Out out(x, M, N);
  const at::Tensor sf = float_contiguous(scale);
  const c10::MaybeOwned<at::Tensor> wc = q_w.expect_contiguous();
  const float* s = sf.data_ptr<float>();
  const int8_t* w = wc->data_ptr<int8_t>();
  const bool avx2 = use_avx2();
  const cpu::RowGuard guard(x);  // see int4_weight_only_mm_cpu
  const at::Tensor xk = guard.rescaled() ? guard.rescaled_x() : x;
  float* o = out.data();
  cpu::XI16 xi{};
  if (avx2 && M <= small_m_threshold() && K % 64 == 0 && use_i16(x) &&
      cpu::prepare_x_i16_scratch(xk, K, K, false, xi)) {
    const int64_t F = i16_block(K);
    for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) {
      cpu::w8a16_rows_avx2_i16(xi.xq, M, xi.xs, w, s, K, F, o, N, n0, n1);
    });
  } else {
    auto xf = xk.to(at::kFloat).contiguous();
    if (avx2 && M <= small_m_threshold() && K % 16 == 0) {
      const float* xp = xf.data_ptr<float>();
      for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) { cpu::w8a16_rows_avx2(xp, M, w, s, K, o, N, n0, n1); });
    } else {
      at::Tensor ot = out.tensor();
      if (avx2 && K % 16 == 0) {
        tiled_dequant_mm(xf, N, K, ot,
                         [&](int64_t n, float* dst) { cpu::w8_dequant_rows_avx2(w, s, K, dst, n, n + 1); });
      } else {
        tiled_dequant_mm(xf, N, K, ot, [&](int64_t n, float* dst) {
          for (int64_t k = 0; k < K; ++k) dst[k] = s[n] * int8_field_value(int8_field((uint8_t)w[n * K + k], 0));
        });
      }
    }
  }
  // the reference's weight: q * scale in double (exact)
  guard.finish(o, N, [&](const double* xr, int64_t n) {
    double acc = 0.0;
    for (int64_t k = 0; k < K; ++k) acc += xr[k] * ((double)w[n * K + k] * (double)s[n]);
    return acc;
  });
  return out.result(avx2);
}

// Rows with NaN/inf get scale NaN and codes 0, so the GEMM output row is NaN rather than silently finite.
std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cpu(const at::Tensor& x) {
  check_x_2d(x);
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  auto xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_per_token_int8", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = scale.data_ptr<float>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* row = xp + m * K;
        float amax = 0.f;
        bool finite = true;
        for (int64_t k = 0; k < K; ++k) {
          const float v = static_cast<float>(row[k]);
          finite &= std::isfinite(v);
          amax = std::max(amax, std::fabs(v));
        }
        int8_t* qr = qp + m * K;
        if (!finite) {
          sp[m] = std::nanf("");
          std::fill(qr, qr + K, 0);
          continue;
        }
        float s = amax / 127.f;
        s = s > 0.f ? s : 1.f;
        sp[m] = s;
        for (int64_t k = 0; k < K; ++k)
          qr[k] = (int8_t)clampf(round_half_even(static_cast<float>(row[k]) / s), -127.f, 127.f);
      }
    });
  });
  return {q, scale};
}

at::Tensor int8_dynamic_mm_cpu(const at::Tensor& x, const at::Tensor& q_w, const at::Tensor& w_scale) {
  check_int8_mm_args(x, q_w, w_scale, "w_scale");
  const int64_t M = x.size(0), K = x.size(1), N = q_w.size(0);
  TORCH_CHECK(K < (1 << 17), "K=", K, " is too large for exact int32 accumulation (needs K < 131072)");
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  auto [qx, sx] = quantize_per_token_int8_cpu(x);
  auto acc = at::empty({M, N}, x.options().dtype(at::kInt));
  auto wc = q_w.contiguous();
  const int8_t* w = wc.data_ptr<int8_t>();
  const int8_t* xq = qx.data_ptr<int8_t>();
  int32_t* a = acc.data_ptr<int32_t>();
  if (use_avx2() && K % 32 == 0) {
    for_n_tiles(N, 8, [&](int64_t n0, int64_t n1) { cpu::i8i8_rows_avx2(xq, M, K, w, K, a, N, n0, n1); });
  } else {
    for_n_tiles(N, 8, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
          int32_t sum = 0;
          for (int64_t k = 0; k < K; ++k) sum += (int32_t)xq[m * K + k] * (int32_t)w[n * K + k];
          a[m * N + n] = sum;
        }
    });
  }
  auto sw = w_scale.to(at::kFloat).contiguous();
  const float* swp = sw.data_ptr<float>();
  const float* sxp = sx.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      // in double, in the reference's order: (acc * x_scale) * w_scale in fp32 overflows for |x| >~ 1e35 where the
      // result itself is finite
      for (int64_t n = 0; n < N; ++n) o[m * N + n] = (float)((double)a[m * N + n] * (double)sxp[m] * (double)swp[n]);
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("int4_weight_only_mm", &int4_weight_only_mm_cpu);
  m.impl("int8_weight_only_mm", &int8_weight_only_mm_cpu);
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cpu);
  m.impl("int8_dynamic_mm", &int8_dynamic_mm_cpu);
  m.impl("int8_dynamic_int4_mm", &int8_dynamic_int4_mm_cpu);
}

}  // namespace qkernels
