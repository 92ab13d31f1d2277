// Argument checks of the integer ops, shared by the CPU (csrc/cpu/int_*.cpp) and CUDA (csrc/cuda/int_*_ops.cpp)
// entry points so that both reject the same inputs with the same messages.
#pragma once
#include <optional>

#include "qkernels/check.h"

namespace qkernels {

inline void check_x_2d(const at::Tensor& x) {
  check_float_input(x, "x");
  check_dim(x, 2, "x");
}

// zero_point: int32 like scale (integer domain) or fp32 group minima (float domain, then required).
inline void check_zero_point(const at::Tensor& w, const std::optional<at::Tensor>& zero_point, int64_t group_size,
                             bool float_zero_point, const char* wname) {
  TORCH_CHECK(!float_zero_point || zero_point.has_value(), "zero_point (the group minimum) is required when "
              "float_zero_point=True");
  if (zero_point.has_value()) {
    check_dtype(*zero_point, float_zero_point ? at::kFloat : at::kInt, "zero_point");
    check_group_params(w, *zero_point, group_size, wname, "zero_point");
  }
}

inline void check_quantize_affine_args(const at::Tensor& w, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& zero_point, int64_t bits, int64_t group_size,
                                       bool is_signed, bool float_zero_point) {
  check_float_input(w, "w");
  check_bits(bits);
  check_groups(w, group_size, "w");
  check_dtype(scale, at::kFloat, "scale");
  check_group_params(w, scale, group_size, "w", "scale");
  TORCH_CHECK(!float_zero_point || !is_signed, "float_zero_point=True uses unsigned codes; pass is_signed=False");
  check_zero_point(w, zero_point, group_size, float_zero_point, "w");
}

inline void check_dequantize_affine_args(const at::Tensor& q, const at::Tensor& scale,
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
}

// W4A16: x [M, K]; packed_w uint8 [N, K/2]; scale float [N, K/group_size]; zero_point int32 like scale.
// allow_ragged_x (the CPU kernel): x may also hold Kx < K columns where the weight's last group is ragged and stored
// padded (K - Kx < group_size, the padding codes holding the group's zero point); the missing columns of x count as
// zeros. Layers with K = 576 and group 128 then skip padding x on every call. The CUDA kernels take Kx == K only
// (the Python wrapper pads x for them).
inline void check_int4_mm_args(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                               const std::optional<at::Tensor>& zero_point, int64_t group_size,
                               bool allow_ragged_x = false) {
  check_x_2d(x);
  check_dtype(packed_w, at::kByte, "packed_w");
  check_dim(packed_w, 2, "packed_w");
  const int64_t Kx = x.size(1), N = packed_w.size(0), K = packed_w.size(1) * 2;
  if (!allow_ragged_x || Kx >= K) {
    TORCH_CHECK(K == Kx, "packed_w must have shape [N, K/2] = [", N, ", ", Kx / 2, "] for x with K=", Kx, ", got ",
                packed_w.sizes());
  }
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "group_size ", group_size, " must be positive and divide K=", K);
  TORCH_CHECK(Kx == K || K - Kx < group_size, "x has ", Kx, " columns but packed_w ", packed_w.sizes(), " holds K=",
              K, ": x may be shorter than the weight only within its last group of ", group_size,
              " (K - group_size < x.size(1) <= K)");
  const int64_t G = K / group_size;
  check_float_input(scale, "scale");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G,
              "scale must have shape [N, K/group_size] = [", N, ", ", G, "], got ", scale.sizes());
  check_same_device(x, packed_w, "x", "packed_w");
  check_same_device(x, scale, "x", "scale");
  if (zero_point.has_value()) {
    check_dtype(*zero_point, at::kInt, "zero_point");
    TORCH_CHECK(zero_point->sizes() == scale.sizes(), "zero_point must have the shape of scale ", scale.sizes(),
                ", got ", zero_point->sizes());
    check_same_device(x, *zero_point, "x", "zero_point");
  }
}

// W8A16 / W8A8: x [M, K]; q_w int8 [N, K]; a per-output-channel scale [N] named scale_name.
inline void check_int8_mm_args(const at::Tensor& x, const at::Tensor& q_w, const at::Tensor& scale,
                               const char* scale_name) {
  check_x_2d(x);
  check_dtype(q_w, at::kChar, "q_w");
  check_dim(q_w, 2, "q_w");
  const int64_t K = x.size(1), N = q_w.size(0);
  TORCH_CHECK(q_w.size(1) == K, "q_w must have shape [N, K] with K=", K, " (x's last dim), got ", q_w.sizes());
  check_float_input(scale, scale_name);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, scale_name, " must have shape [N] = [", N, "], got ",
              scale.sizes());
  check_same_device(x, q_w, "x", "q_w");
  check_same_device(x, scale, "x", scale_name);
}

}  // namespace qkernels
