// CPU kernels for fp8 casts (per-tensor / per-row / 2-D block scales) and the emulated fp8 GEMM.
// Per-element conversion: qkernels/float8.h (the same code the GPU kernels use). Semantics:
// qkernels/reference/float8.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <array>
#include <type_traits>

#include "cpu_dispatch.h"
#include "amax.h"
#include "emulated_mm.h"
#include "row_guard.h"
#include "float_kernels.h"
#include "qkernels/check.h"
#include "qkernels/float8.h"
#include "qkernels/float_checks.h"

namespace qkernels {
namespace {

// Inner loops as functions of plain values: captured references (and uint8_t stores, which may alias anything)
// would otherwise force reloads of the loop bound and encoder constants every element and block vectorization.
template <typename T>
void encode_run(const T* src, uint8_t* dst, int64_t n, float scale, const MiniFloatEncoder enc) {
  for (int64_t i = 0; i < n; ++i) dst[i] = minifloat_encode(static_cast<float>(src[i]) / scale, enc);
}

template <typename T>
void decode_run(const uint8_t* src, T* dst, int64_t n, float scale, const float* lut) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(lut[src[i]] * scale);
}

std::array<float, 256> decode_table(const MiniFloat& f) {
  std::array<float, 256> lut;
  for (int c = 0; c < 256; ++c) lut[c] = minifloat_to_float((uint32_t)c, f);
  return lut;
}

// One run of quantize_fp8 / dequantize_fp8: the AVX2 kernel where it applies (bit-identical), else the loop.
template <typename T>
void encode_any(const T* src, uint8_t* dst, int64_t n, float scale, const MiniFloatEncoder& enc, bool avx2) {
  if (avx2 && cpu::float_kind<T>() >= 0) {
    cpu::fp8_encode_avx2(src, (cpu::FloatKind)cpu::float_kind<T>(), n, scale, enc, dst);
  } else {
    encode_run(src, dst, n, scale, enc);
  }
}

template <typename T>
void decode_any(const uint8_t* src, T* dst, int64_t n, float scale, const cpu::Fp8HalfDecode& d, bool avx2,
                const float* lut) {
  if (avx2 && cpu::float_kind<T>() >= 0) {
    cpu::fp8_decode_avx2(src, n, scale, d, dst, (cpu::FloatKind)cpu::float_kind<T>());
  } else {
    decode_run(src, dst, n, scale, lut);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                                    at::ScalarType dtype, int64_t block_rows, int64_t block_cols,
                                                    bool saturate) {
  check_float_input(x, "x");
  const MiniFloat fmt = minifloat_format(fp8_format_id(dtype, "dtype"));
  const auto grid = check_blocks(x, block_rows, block_cols, "x");
  const int64_t R = x.size(0), C = x.size(1), nbc = grid[1];
  auto xc = x.contiguous();
  auto q = at::empty({R, C}, x.options().dtype(at::kByte));
  at::Tensor s;
  if (scale.has_value()) {
    s = checked_scale_copy(x, *scale, grid);
  } else {
    s = at::empty({grid[0], nbc}, x.options().dtype(at::kFloat));
  }
  if (R == 0 || C == 0) return {q, scale.has_value() ? s : s.fill_(1.f)};
  const float fmax = minifloat_max(fmt);
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp8", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    if (!scale.has_value()) {
      // amax of every (row, column block), then folded over the block's rows: parallel for every granularity
      auto row_amax = at::empty({R, nbc}, x.options().dtype(at::kFloat));
      float* ra = row_amax.data_ptr<float>();
      at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < nbc; ++j) {
            ra[r * nbc + j] = cpu::finite_amax(xp + r * C + j * block_cols, block_cols);
          }
      });
      float* sp = s.data_ptr<float>();
      for (int64_t g = 0; g < grid[0]; ++g)
        for (int64_t j = 0; j < nbc; ++j) {
          float m = 0.f;
          for (int64_t r = g * block_rows; r < (g + 1) * block_rows; ++r) m = std::max(m, ra[r * nbc + j]);
          sp[g * nbc + j] = fp8_scale_from_amax(m, fmax);
        }
    }
    const float* sp = s.data_ptr<float>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    const MiniFloatEncoder enc = make_encoder(fmt, saturate);
    const bool avx2 = cpu::use_avx2();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* srow = sp + (r / block_rows) * nbc;
        for (int64_t j = 0; j < nbc; ++j) {
          encode_any(xp + r * C + j * block_cols, qp + r * C + j * block_cols, block_cols, srow[j], enc, avx2);
        }
      }
    });
  });
  return {q, s};
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype, int64_t block_rows,
                              int64_t block_cols, at::ScalarType out_dtype) {
  check_dtype(q, at::kByte, "q");
  check_float_out_dtype(out_dtype);
  const MiniFloat fmt = minifloat_format(fp8_format_id(dtype, "dtype"));
  const auto grid = check_blocks(q, block_rows, block_cols, "q");
  check_scale_grid(scale, grid, "scale");
  check_same_device(q, scale, "q", "scale");
  const int64_t R = q.size(0), C = q.size(1), nbc = grid[1];
  auto out = at::empty({R, C}, q.options().dtype(out_dtype));
  if (R == 0 || C == 0) return out;
  const auto lut = decode_table(fmt);
  const bool avx2 = cpu::use_avx2();
  const auto hd = std::make_unique<cpu::Fp8HalfDecode>(cpu::make_fp8_half_decode(fmt));
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_fp8", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* srow = sp + (r / block_rows) * nbc;
        for (int64_t j = 0; j < nbc; ++j) {
          decode_any(qp + r * C + j * block_cols, op + r * C + j * block_cols, block_cols, srow[j], *hd, avx2,
                     lut.data());
        }
      }
    });
  });
  return out;
}

// Up to this many rows of activations, the fp8 GEMMs run the fused AVX2 kernel (weights decoded in registers, never
// written out); beyond it, decode + sgemm. The fused kernel re-decodes the weights for every 4 activation rows;
// at 4096 x 4096 (2-core Zen 3, bf16 x) it was still ahead of decode + sgemm at M = 16 (fp8 6.9 vs 7.9 ms, fp4
// 6.0 vs 11.5 ms) and level with fp32 F.linear at M = 32.
constexpr int64_t kFp8FusedMaxM = 16;

// xf [M, K] fp32 (contiguous) @ dequant(w [N, K] codes of format fb, scale grid ws with blocks bb)^T + bias, fp32
// accumulation, -> out_dtype: the weight side shared by fp8_mm and fp8_weight_only_mm.
at::Tensor fp8_weight_gemm(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& ws, std::array<int64_t, 2> bb,
                           const MiniFloat& fb, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  const bool avx2 = cpu::use_avx2();
  const auto hd = std::make_unique<cpu::Fp8HalfDecode>(cpu::make_fp8_half_decode(fb));
  const auto lut = decode_table(fb);
  auto wc = w.contiguous(), wsc = ws.contiguous();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float* sp = wsc.data_ptr<float>();
  const int64_t gs = ws.size(1);
  // extreme rows of x rescaled, outputs the fp32 paths could not get right recomputed (row_guard.h)
  const cpu::RowGuard guard(xf);
  const at::Tensor xk = guard.rescaled() ? guard.rescaled_x() : xf;
  const float* xp = xk.data_ptr<float>();
  at::Tensor out;
  if (avx2 && M <= kFp8FusedMaxM && M > 0 && N > 0 && K % 16 == 0 && bb[1] % 16 == 0) {
    // fused: the codes go straight into the FMA tiles with their block scales (float_kernels.h)
    out = at::empty({M, N}, xf.options());
    float* op = out.data_ptr<float>();
    cpu::for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) {
      cpu::fp8_mm_rows_avx2(xp, M, wp, sp, gs, bb[0], bb[1], K, *hd, op, N, n0, n1);
    });
  } else {
    out = cpu::emulated_mm(xk, N, [&](int64_t n, float* dst) {
      const float* srow = sp + (n / bb[0]) * gs;
      for (int64_t k0 = 0; k0 < K; k0 += bb[1])
        decode_any(wp + n * K + k0, dst + k0, bb[1], srow[k0 / bb[1]], *hd, avx2, lut.data());
    });
  }
  // the reference's weight: the fp32 product value * scale
  guard.finish(out, [&](const double* xr, int64_t n) {
    const float* srow = sp + (n / bb[0]) * gs;
    double acc = 0.0;
    for (int64_t k = 0; k < K; ++k) acc += xr[k] * (double)(lut[wp[n * K + k]] * srow[k / bb[1]]);
    return acc;
  });
  return cpu::finish_mm(out, bias, out_dtype);
}

at::Tensor fp8_mm_cpu(const at::Tensor& a, const at::Tensor& a_scale, at::ScalarType a_dtype, const at::Tensor& b,
                      const at::Tensor& b_scale, at::ScalarType b_dtype, const std::optional<at::Tensor>& bias,
                      at::ScalarType out_dtype) {
  const Fp8MmBlocks blk = check_fp8_mm_args(a, a_scale, a_dtype, b, b_scale, b_dtype, bias, out_dtype);
  // a decoded exactly with its scales (the reference's dequantization), then the shared weight side
  auto af = a.size(0) == 0 ? at::empty({0, a.size(1)}, a.options().dtype(at::kFloat))  // (no blocks to tile)
                           : dequantize_fp8_cpu(a, a_scale, a_dtype, blk.ba[0], blk.ba[1], at::kFloat);
  return fp8_weight_gemm(af, b, b_scale, blk.bb, blk.fb, bias, out_dtype);
}

at::Tensor fp8_weight_only_mm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                  at::ScalarType w_dtype, const std::optional<at::Tensor>& bias) {
  const auto bb = check_fp8_weight_only_args(x, w, w_scale, w_dtype, bias);
  const MiniFloat fb = minifloat_format(fp8_format_id(w_dtype, "w_dtype"));
  return fp8_weight_gemm(x.contiguous().to(at::kFloat), w, w_scale, bb, fb, bias, x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("quantize_fp8", &quantize_fp8_cpu);
  m.impl("dequantize_fp8", &dequantize_fp8_cpu);
  m.impl("fp8_mm", &fp8_mm_cpu);
  m.impl("fp8_weight_only_mm", &fp8_weight_only_mm_cpu);
}

}  // namespace qkernels
