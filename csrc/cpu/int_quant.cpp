// CPU kernels for integer affine quantization and int4 packing. Per-element math: qkernels/int_quant.h.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "qkernels/check.h"
#include "qkernels/int_checks.h"
#include "qkernels/int_quant.h"

namespace qkernels {
namespace {

// Each parallel task handles whole groups; a grain of ~16K elements keeps thread overhead negligible.
int64_t group_grain(int64_t group_size) { return std::max<int64_t>(1, 16384 / group_size); }

std::tuple<at::Tensor, at::Tensor> choose_qparams_affine_cpu(const at::Tensor& w, int64_t bits, int64_t group_size,
                                                             bool symmetric, bool is_signed, bool float_zero_point) {
  check_float_input(w, "w");
  check_bits(bits);
  check_groups(w, group_size, "w");
  auto wc = w.contiguous();
  auto pshape = w.sizes().vec();
  pshape.back() = w.size(-1) / group_size;
  auto scale = at::empty(pshape, w.options().dtype(at::kFloat));
  auto zp = at::empty(pshape, w.options().dtype(float_zero_point ? at::kFloat : at::kInt));
  const int64_t ngroups = scale.numel();
  float* s_ptr = scale.data_ptr<float>();
  std::atomic<bool> nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "choose_qparams_affine", [&] {
    const scalar_t* w_ptr = wc.data_ptr<scalar_t>();
    at::parallel_for(0, ngroups, group_grain(group_size), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const scalar_t* src = w_ptr + g * group_size;
        float vmin = std::numeric_limits<float>::infinity(), vmax = -vmin;
        bool finite = true;
        for (int64_t i = 0; i < group_size; ++i) {
          float v = static_cast<float>(src[i]);
          finite &= std::isfinite(v);
          vmin = std::min(vmin, v);
          vmax = std::max(vmax, v);
        }
        if (!finite) nonfinite = true;
        if (float_zero_point) {
          float_zp_qparams(vmin, vmax, (int)bits, s_ptr + g, zp.data_ptr<float>() + g);
        } else {
          affine_qparams(vmin, vmax, (int)bits, symmetric, is_signed, s_ptr + g, zp.data_ptr<int32_t>() + g);
        }
      }
    });
  });
  TORCH_CHECK(!nonfinite, "w contains NaN or inf; quantization needs finite values");
  return {scale, zp};
}

at::Tensor quantize_affine_cpu(const at::Tensor& w, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                               int64_t bits, int64_t group_size, bool is_signed, bool float_zero_point) {
  check_quantize_affine_args(w, scale, zero_point, bits, group_size, is_signed, float_zero_point);
  // a NaN would reach a float->int conversion (undefined behaviour), so refuse it up front
  TORCH_CHECK(w.numel() == 0 || at::isfinite(w).all().item<bool>(), "w contains NaN or inf; quantization needs finite values");
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  auto q = at::empty(w.sizes(), w.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t ngroups = sc.numel();
  const QRange r = int_range((int)bits, is_signed);
  const float* s_ptr = sc.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_affine", [&] {
    const scalar_t* w_ptr = wc.data_ptr<scalar_t>();
    at::parallel_for(0, ngroups, group_grain(group_size), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const scalar_t* src = w_ptr + g * group_size;
        const float s = s_ptr[g];
        if (float_zero_point) {
          const float mn = zc.data_ptr<float>()[g];
          uint8_t* dst = q.data_ptr<uint8_t>() + g * group_size;
          for (int64_t i = 0; i < group_size; ++i)
            dst[i] = (uint8_t)quantize_float_zp(static_cast<float>(src[i]), s, mn, (int)bits);
        } else {
          const int32_t z = zc.defined() ? zc.data_ptr<int32_t>()[g] : 0;
          if (is_signed) {
            int8_t* dst = q.data_ptr<int8_t>() + g * group_size;
            for (int64_t i = 0; i < group_size; ++i) dst[i] = (int8_t)quantize_int(static_cast<float>(src[i]), s, z, r);
          } else {
            uint8_t* dst = q.data_ptr<uint8_t>() + g * group_size;
            for (int64_t i = 0; i < group_size; ++i) dst[i] = (uint8_t)quantize_int(static_cast<float>(src[i]), s, z, r);
          }
        }
      }
    });
  });
  return q;
}

at::Tensor dequantize_affine_cpu(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                                 int64_t group_size, bool float_zero_point, at::ScalarType out_dtype) {
  check_dequantize_affine_args(q, scale, zero_point, group_size, float_zero_point, out_dtype);
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  auto out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  const int64_t ngroups = sc.numel();
  const bool q_signed = q.scalar_type() == at::kChar;
  const float* s_ptr = sc.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_affine", [&] {
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, ngroups, group_grain(group_size), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const float s = s_ptr[g];
        scalar_t* dst = o_ptr + g * group_size;
        for (int64_t i = 0; i < group_size; ++i) {
          const int64_t idx = g * group_size + i;
          const int32_t v = q_signed ? (int32_t)qc.data_ptr<int8_t>()[idx] : (int32_t)qc.data_ptr<uint8_t>()[idx];
          float r;
          if (float_zero_point) {
            r = dequantize_float_zp(v, s, zc.data_ptr<float>()[g]);
          } else {
            r = dequantize_int(v, s, zc.defined() ? zc.data_ptr<int32_t>()[g] : 0);
          }
          dst[i] = static_cast<scalar_t>(r);
        }
      }
    });
  });
  return out;
}

at::Tensor pack_int4_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte,
              "q must be int8 (values in [-8, 7]) or uint8 (values in [0, 15]), got ", q.scalar_type());
  TORCH_CHECK(q.dim() >= 1, "q must have at least 1 dim");
  TORCH_CHECK(q.size(-1) % 2 == 0, "the last dim of q must be even to pack two int4 per byte, got ", q.size(-1));
  const bool is_signed = q.scalar_type() == at::kChar;
  auto qc = q.contiguous();
  auto shape = q.sizes().vec();
  shape.back() /= 2;
  auto out = at::empty(shape, q.options().dtype(at::kByte));
  const int64_t n = out.numel();
  const int32_t lo = is_signed ? -8 : 0, hi = is_signed ? 7 : 15;
  uint8_t* o = out.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    bool local_bad = false;
    for (int64_t i = b; i < e; ++i) {
      int32_t a, c;
      if (is_signed) {
        a = qc.data_ptr<int8_t>()[2 * i];
        c = qc.data_ptr<int8_t>()[2 * i + 1];
      } else {
        a = qc.data_ptr<uint8_t>()[2 * i];
        c = qc.data_ptr<uint8_t>()[2 * i + 1];
      }
      local_bad |= (a < lo) | (a > hi) | (c < lo) | (c > hi);
      o[i] = pack_nibbles(a, c);
    }
    if (local_bad) bad = true;
  });
  TORCH_CHECK(!bad, "q has values outside the int4 range [", lo, ", ", hi, "] for dtype ", q.scalar_type());
  return out;
}

at::Tensor unpack_int4_cpu(const at::Tensor& packed, bool is_signed) {
  check_dtype(packed, at::kByte, "packed");
  TORCH_CHECK(packed.dim() >= 1, "packed must have at least 1 dim");
  auto pc = packed.contiguous();
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  auto out = at::empty(shape, packed.options().dtype(is_signed ? at::kChar : at::kByte));
  const uint8_t* p = pc.data_ptr<uint8_t>();
  const int64_t n = pc.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    if (is_signed) {
      int8_t* o = out.data_ptr<int8_t>();
      for (int64_t i = b; i < e; ++i) {
        o[2 * i] = (int8_t)nibble_value(p[i], true);
        o[2 * i + 1] = (int8_t)nibble_value(p[i] >> 4, true);
      }
    } else {
      uint8_t* o = out.data_ptr<uint8_t>();
      for (int64_t i = b; i < e; ++i) {
        o[2 * i] = p[i] & 0xF;
        o[2 * i + 1] = p[i] >> 4;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("choose_qparams_affine", &choose_qparams_affine_cpu);
  m.impl("quantize_affine", &quantize_affine_cpu);
  m.impl("dequantize_affine", &dequantize_affine_cpu);
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
}

}  // namespace qkernels
