// CPU kernels for 4-bit float elements (e2m1, e1m2), the MXFP4 / NVFP4 block formats and the emulated fp4 GEMM.
// Per-element math: qkernels/float4.h (shared with the GPU). Semantics: qkernels/reference/float4.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"
#include "amax.h"
#include "emulated_mm.h"
#include "row_guard.h"
#include "float_kernels.h"
#include "qkernels/check.h"
#include "qkernels/float4.h"
#include "qkernels/float_checks.h"

namespace qkernels {
namespace {

// 16 nibble values of an element format
std::array<float, 16> nibble_table(const MiniFloat& f) {
  std::array<float, 16> t;
  for (int c = 0; c < 16; ++c) t[c] = fp4_decode((uint32_t)c, f);
  return t;
}

// The AVX2 kernels' tables for element format f with block scales of kind nv and global scale g.
std::unique_ptr<cpu::Fp4Decode> make_fp4_decode(const MiniFloat& f, bool nv, float g) {
  auto d = std::make_unique<cpu::Fp4Decode>();
  for (int c = 0; c < 16; ++c) d->twice[c] = (int8_t)(2.f * fp4_decode((uint32_t)c, f));  // exact: |2 v| <= 12
  for (int c = 0; c < 256; ++c) d->block_scale[c] = fp4_block_scale((uint8_t)c, nv, g);
  d->B = nv ? kNVBlock : kMXBlock;
  return d;
}

// Inner loops as functions of plain values (see float8.cpp): no captured references in the loops, so they vectorize.
template <typename T>
void encode_pairs(const T* src, uint8_t* dst, int64_t npairs, float scale, const MiniFloatEncoder enc) {
  for (int64_t i = 0; i < npairs; ++i)
    dst[i] = (uint8_t)(minifloat_encode(static_cast<float>(src[2 * i]) / scale, enc) |
                       (minifloat_encode(static_cast<float>(src[2 * i + 1]) / scale, enc) << 4));
}

template <typename T>
void encode_pairs_scaled(const T* src, uint8_t* dst, int64_t npairs, const float* scale, const MiniFloatEncoder enc) {
  for (int64_t i = 0; i < npairs; ++i)
    dst[i] = (uint8_t)(minifloat_encode(static_cast<float>(src[2 * i]) / scale[i], enc) |
                       (minifloat_encode(static_cast<float>(src[2 * i + 1]) / scale[i], enc) << 4));
}

float global_scale_value(const at::Tensor& g, const char* name) {
  check_global_scale(g, name);
  return g.item<float>();
}

at::Tensor fp4_encode_cpu(const at::Tensor& x, c10::string_view element) {
  check_fp4_encode_input(x);
  const MiniFloat f = fp4_element_format(element);
  auto shape = x.sizes().vec();
  shape.back() /= 2;
  auto out = at::empty(shape, x.options().dtype(at::kByte));
  const int64_t n = out.numel();
  auto xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp4_encode", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    const MiniFloatEncoder enc = make_encoder(f, true);
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      encode_pairs(xp + 2 * b, o + b, e - b, 1.f, enc);
    });
  });
  return out;
}

at::Tensor fp4_decode_cpu(const at::Tensor& packed, c10::string_view element, at::ScalarType out_dtype) {
  check_fp4_decode_input(packed, out_dtype);
  const auto t = nibble_table(fp4_element_format(element));
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  auto out = at::empty(shape, packed.options().dtype(out_dtype));
  auto pc = packed.contiguous();
  const uint8_t* p = pc.data_ptr<uint8_t>();
  const int64_t n = pc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "fp4_decode", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        o[2 * i] = static_cast<scalar_t>(t[p[i] & 0xF]);
        o[2 * i + 1] = static_cast<scalar_t>(t[p[i] >> 4]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp4_cpu(const at::Tensor& x, c10::string_view format,
                                                                c10::string_view element,
                                                                const std::optional<at::Tensor>& global_scale) {
  const bool nv = fp4_is_nv(format);
  const MiniFloat f = fp4_element_format(element);
  const int64_t B = nv ? kNVBlock : kMXBlock;
  check_quantize_fp4_input(x, format, B);
  const int64_t R = x.size(0), K = x.size(1);
  auto xc = x.contiguous();
  const int64_t nb = K / B;
  auto packed = at::empty({R, K / 2}, x.options().dtype(at::kByte));
  auto scale = at::empty({R, nb}, x.options().dtype(at::kByte));
  float g = 1.f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp4", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    if (nv) {
      if (global_scale.has_value()) {
        check_same_device(x, *global_scale, "x", "global_scale");
        g = global_scale_value(*global_scale, "global_scale");
      } else {
        // tensor amax over finite values (max is exact, so the parallel reduction order does not matter)
        const float amax = at::parallel_reduce(
            0, R * K, 1 << 16, 0.f,
            [&](int64_t b, int64_t e, float m) { return std::max(m, cpu::finite_amax(xp + b, e - b)); },
            [](float p, float q) { return std::max(p, q); });
        g = nv_global_scale(amax, f);
      }
    }
    uint8_t* pp = packed.data_ptr<uint8_t>();
    uint8_t* sp = scale.data_ptr<uint8_t>();
    const uint8_t nan_scale = nv ? 0x7F : 0xFF;
    const MiniFloatEncoder enc = make_encoder(f, true);
    // Row by row: first every block's scale, spread to one divisor per output byte; then one encode loop over the
    // whole row. (Encoding block by block leaves NVFP4's 8-byte blocks to the scalar remainder of the vector loop.)
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
      std::vector<float> pair_scale(K / 2);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* src = xp + r * K;
        uint8_t* dst = pp + r * (K / 2);
        uint8_t* srow = sp + r * nb;
        bool any_zero = false;
        for (int64_t j = 0; j < nb; ++j) {
          const int32_t abits = cpu::finite_amax_bits_or_neg(src + j * B, B);
          const float amax = bits_f32((uint32_t)std::max(abits, 0));
          // a non-finite block gets the NaN scale code; its elements (like those of an NV block whose scale rounds
          // to 0) are stored as zeros below
          srow[j] = abits < 0 ? nan_scale : (nv ? nv_scale_code(amax, g, f) : mx_scale_code(amax, f));
          const float s = fp4_block_scale(srow[j], nv, g);
          const bool usable = s > 0.f;
          any_zero |= !usable;
          std::fill(pair_scale.begin() + j * (B / 2), pair_scale.begin() + (j + 1) * (B / 2), usable ? s : 1.f);
        }
        encode_pairs_scaled(src, dst, K / 2, pair_scale.data(), enc);
        if (any_zero)
          for (int64_t j = 0; j < nb; ++j)
            if (!(fp4_block_scale(srow[j], nv, g) > 0.f)) std::fill(dst + j * (B / 2), dst + (j + 1) * (B / 2), 0);
      }
    });
  });
  auto gt = at::full({}, g, x.options().dtype(at::kFloat));
  return {packed, scale, gt};
}

// decodes row r of a block-scaled fp4 matrix into dst[K] (fp32, the exact product value * block scale)
struct Fp4Rows {
  const uint8_t* p;
  const uint8_t* s;
  int64_t K, B;
  bool nv;
  float g;
  std::array<float, 16> t;
  void operator()(int64_t r, float* dst) const {
    const uint8_t* pr = p + r * (K / 2);
    const uint8_t* sr = s + r * (K / B);
    for (int64_t j = 0; j < K / B; ++j) {
      const float sc = fp4_block_scale(sr[j], nv, g);
      for (int64_t i = j * B; i < (j + 1) * B; i += 2) {
        const uint8_t byte = pr[i / 2];
        dst[i] = t[byte & 0xF] * sc;
        dst[i + 1] = t[byte >> 4] * sc;
      }
    }
  }
};

at::Tensor dequantize_fp4_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& global_scale,
                              c10::string_view format, c10::string_view element, at::ScalarType out_dtype) {
  const bool nv = fp4_is_nv(format);
  const MiniFloat f = fp4_element_format(element);
  check_float_out_dtype(out_dtype);
  const int64_t B = nv ? kNVBlock : kMXBlock;
  const int64_t K = check_fp4_operand(packed, scale, B, "packed", "scale");
  const float g = global_scale_value(global_scale, "global_scale");
  const int64_t R = packed.size(0);
  auto pc = packed.contiguous(), sc = scale.contiguous();
  const Fp4Rows rows{pc.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), K, B, nv, g, nibble_table(f)};
  auto out = at::empty({R, K}, packed.options().dtype(out_dtype));
  if (R == 0 || K == 0) return out;
  const bool avx2 = cpu::use_avx2() && K % 32 == 0;
  const auto dec = make_fp4_decode(f, nv, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_fp4", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (avx2 && cpu::float_kind<scalar_t>() >= 0) {  // bit-identical to the loop below
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          cpu::fp4_decode_row_avx2(rows.p + r * (K / 2), rows.s + r * (K / B), K, *dec, o + r * K,
                                   (cpu::FloatKind)cpu::float_kind<scalar_t>());
        }
      });
      return;
    }
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(K);
      for (int64_t r = r0; r < r1; ++r) {
        rows(r, buf.data());
        for (int64_t k = 0; k < K; ++k) o[r * K + k] = static_cast<scalar_t>(buf[k]);
      }
    });
  });
  return out;
}

// Up to this many rows of activations, the fp4 GEMMs run the fused AVX2 kernel (weights decoded in registers);
// beyond it decode + sgemm (the fused kernel re-decodes the weights for every 4 activation rows; measured
// crossover: see kFp8FusedMaxM in float8.cpp).
constexpr int64_t kFp4FusedMaxM = 16;

// xf [M, K] fp32 (contiguous) @ dequant_fp4(rb)^T + bias, fp32 accumulation, -> out_dtype: the weight side shared by
// fp4_mm and fp4_weight_only_mm. g: rb's global scale.
// x16: the bf16/fp16 x that xf was converted from (undefined for fp4_mm's decoded fp32 activations): when given,
// the fused kernel may run on its int16 copy (cpu::use_i16, QKERNELS_CPU_I16), as the int4 / int8 kernels do.
at::Tensor fp4_weight_gemm(const at::Tensor& xf, const at::Tensor& x16, const Fp4Rows& rb, int64_t N,
                           const MiniFloat& f, float g, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype) {
  const int64_t M = xf.size(0), K = xf.size(1);
  // extreme rows of x rescaled, outputs the fp32 paths could not get right recomputed (row_guard.h)
  const cpu::RowGuard guard(xf);
  const at::Tensor xk = guard.rescaled() ? guard.rescaled_x() : xf;
  const float* xp = xk.data_ptr<float>();
  at::Tensor out;
  if (cpu::use_avx2() && M <= kFp4FusedMaxM && M > 0 && N > 0 && K % 32 == 0) {
    // fused: the nibbles go straight into the FMA (or vpmaddwd) tiles (float_kernels.h)
    const auto dec = make_fp4_decode(f, rb.nv, g);
    out = at::empty({M, N}, xf.options());
    float* op = out.data_ptr<float>();
    at::Tensor xq, xs, xsum;
    // int16 activations where the decode dominates: M < 4 (4096 x 4096, 2-core Zen 3, weights from DRAM, M = 1:
    // mxfp4 1016 vs 1262 us, nvfp4 1153 vs 1315 us). At M = 4 and 16 the two kernels were within 5% (nvfp4's int16
    // one slightly slower), so the fp32 kernel keeps those.
    if (x16.defined() && M < 4 && K % 64 == 0 && cpu::use_i16(x16) &&
        cpu::prepare_x_i16(xk, K, false, xq, xs, xsum)) {
      const int64_t F = cpu::i16_block(K);
      cpu::for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) {
        cpu::fp4_mm_rows_avx2_i16(xq.data_ptr<int16_t>(), M, xs.data_ptr<float>(), F, rb.p, rb.s, K, *dec, op, N, n0,
                                  n1);
      });
    } else {
      cpu::for_n_ranges(N, K, M, [&](int64_t n0, int64_t n1) {
        cpu::fp4_mm_rows_avx2(xp, M, rb.p, rb.s, K, *dec, op, N, n0, n1);
      });
    }
  } else {
    out = cpu::emulated_mm(xk, N, rb);
  }
  // the reference's weight: the fp32 products value * block scale (Fp4Rows)
  guard.finish(out, [&](const double* xr, int64_t n) {
    std::vector<float> wrow(K);
    rb(n, wrow.data());
    double acc = 0.0;
    for (int64_t k = 0; k < K; ++k) acc += xr[k] * (double)wrow[k];
    return acc;
  });
  return cpu::finish_mm(out, bias, out_dtype);
}

at::Tensor fp4_mm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_global_scale,
                      const at::Tensor& b, const at::Tensor& b_scale, const at::Tensor& b_global_scale,
                      c10::string_view format, c10::string_view element, const std::optional<at::Tensor>& bias,
                      at::ScalarType out_dtype) {
  const bool nv = fp4_is_nv(format);
  const MiniFloat f = fp4_element_format(element);
  const int64_t B = nv ? kNVBlock : kMXBlock;
  const int64_t K = check_fp4_mm_args(a, a_scale, a_global_scale, b, b_scale, b_global_scale, B, bias, out_dtype);
  const float ga = global_scale_value(a_global_scale, "a_global_scale");
  const float gb = global_scale_value(b_global_scale, "b_global_scale");
  const int64_t M = a.size(0), N = b.size(0);
  auto ac = a.contiguous(), asc = a_scale.contiguous(), bc = b.contiguous(), bsc = b_scale.contiguous();
  const auto t = nibble_table(f);
  // a decoded exactly with its scales (the reference's dequantization), then the shared weight side
  const Fp4Rows ra{ac.data_ptr<uint8_t>(), asc.data_ptr<uint8_t>(), K, B, nv, ga, t};
  auto af = at::empty({M, K}, a.options().dtype(at::kFloat));
  for (int64_t m = 0; m < M; ++m) ra(m, af.data_ptr<float>() + m * K);
  const Fp4Rows rb{bc.data_ptr<uint8_t>(), bsc.data_ptr<uint8_t>(), K, B, nv, gb, t};
  return fp4_weight_gemm(af, at::Tensor(), rb, N, f, gb, bias, out_dtype);
}

at::Tensor fp4_weight_only_mm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                  const at::Tensor& w_global_scale, c10::string_view format,
                                  c10::string_view element, const std::optional<at::Tensor>& bias) {
  const bool nv = fp4_is_nv(format);
  const MiniFloat f = fp4_element_format(element);
  const int64_t B = nv ? kNVBlock : kMXBlock;
  const int64_t K = check_fp4_weight_only_args(x, w, w_scale, w_global_scale, B, bias);
  const float g = global_scale_value(w_global_scale, "w_global_scale");
  auto wc = w.contiguous(), wsc = w_scale.contiguous();
  const Fp4Rows rb{wc.data_ptr<uint8_t>(), wsc.data_ptr<uint8_t>(), K, B, nv, g, nibble_table(f)};
  const bool half = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  return fp4_weight_gemm(x.contiguous().to(at::kFloat), half ? x.contiguous() : at::Tensor(), rb, w.size(0), f, g,
                         bias, x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("fp4_encode", &fp4_encode_cpu);
  m.impl("fp4_decode", &fp4_decode_cpu);
  m.impl("quantize_fp4", &quantize_fp4_cpu);
  m.impl("dequantize_fp4", &dequantize_fp4_cpu);
  m.impl("fp4_mm", &fp4_mm_cpu);
  m.impl("fp4_weight_only_mm", &fp4_weight_only_mm_cpu);
}

}  // namespace qkernels
