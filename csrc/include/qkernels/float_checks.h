// Argument checks of the fp8 / fp4 ops, shared by the CPU (csrc/cpu/float8.cpp, float4.cpp) and CUDA
// (csrc/cuda/float_cast_ops.cpp) entry points so that both reject the same inputs with the same messages.
#pragma once
#include <array>
#include <cctype>
#include <optional>
#include <string>
#include <vector>

#include "qkernels/check.h"
#include "qkernels/float8.h"

namespace qkernels {

// Names of the float8.h formats (QK_MINIFLOATS) with `bits` bits, for error texts: "float8_e4m3fn, float8_e5m2, ..."
// or, quoted, "'e2m1' or 'e1m2'". Generated from the table, so a message never lists a format the table lacks.
inline std::string minifloat_names(int bits, bool quoted) {
  std::vector<std::string> names;
  for (int id = 0; id < kNumMiniFloats; ++id) {
    const MiniFloat f = minifloat_format(id);
    const std::string n = minifloat_name(id);
    if (1 + f.ebits + f.mbits == bits) names.push_back(quoted ? "'" + n + "'" : n);
  }
  std::string r;
  for (size_t i = 0; i < names.size(); ++i) {
    r += (i == 0 ? "" : (quoted && i + 1 == names.size() ? " or " : ", ")) + names[i];
  }
  return r;
}

// The float8.h format id of the `bits`-bit format called `name`, -1 if there is none.
inline int minifloat_id(c10::string_view name, int bits) {
  for (int id = 0; id < kNumMiniFloats; ++id) {
    const MiniFloat f = minifloat_format(id);
    if (1 + f.ebits + f.mbits == bits && name == minifloat_name(id)) return id;
  }
  return -1;
}

// fp8 torch dtype -> float8.h format id: by name (c10 spells Float8_e4m3fn, the table float8_e4m3fn), so the table
// is the only list of fp8 formats.
inline int fp8_format_id(at::ScalarType dt, const char* name) {
  std::string n = c10::toString(dt);
  if (!n.empty()) n[0] = (char)std::tolower((unsigned char)n[0]);
  const int id = minifloat_id(n, 8);
  TORCH_CHECK(id >= 0, name, " must be one of ", minifloat_names(8, false), ", got ", dt);
  return id;
}

inline void check_float_out_dtype(at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "out_dtype must be float32, bfloat16, float16 or float64, got ", dt);
}

// block sizes that tile a [R, C] matrix; returns the scale grid shape
inline std::array<int64_t, 2> check_blocks(const at::Tensor& t, int64_t br, int64_t bc, const char* name) {
  check_dim(t, 2, name);
  TORCH_CHECK(br > 0 && bc > 0, "block_rows and block_cols must be positive, got ", br, " and ", bc);
  TORCH_CHECK(t.size(0) % br == 0, "block_rows ", br, " must divide dim 0 of ", name, " (", t.size(0), ")");
  TORCH_CHECK(t.size(1) % bc == 0, "block_cols ", bc, " must divide dim 1 of ", name, " (", t.size(1), ")");
  return {t.size(0) / br, t.size(1) / bc};
}

inline void check_scale_grid(const at::Tensor& s, std::array<int64_t, 2> grid, const char* name) {
  check_dtype(s, at::kFloat, name);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == grid[0] && s.size(1) == grid[1], name, " must have shape [", grid[0], ", ",
              grid[1], "], got ", s.sizes());
}

// A given quantize_fp8 scale: checked against the grid and copied (the op's output must not alias its input).
inline at::Tensor checked_scale_copy(const at::Tensor& x, const at::Tensor& scale, std::array<int64_t, 2> grid) {
  check_scale_grid(scale, grid, "scale");
  check_same_device(x, scale, "x", "scale");
  return scale.contiguous().clone();
}

// Scale grid [G0, G1] of a matrix [R, C] -> block sizes; the grid must tile the matrix exactly.
inline std::array<int64_t, 2> blocks_from_grid(const at::Tensor& t, const at::Tensor& s, const char* tname,
                                               const char* sname) {
  check_dtype(s, at::kFloat, sname);
  TORCH_CHECK(s.dim() == 2, sname, " must be 2-D [", tname, ".size(0) / block_rows, ", tname,
              ".size(1) / block_cols], got shape ", s.sizes());
  const int64_t R = t.size(0), C = t.size(1), G0 = s.size(0), G1 = s.size(1);
  const bool ok = G0 > 0 && G1 > 0 && R % G0 == 0 && C % G1 == 0;
  TORCH_CHECK(ok || (R == 0 && G0 == 0) || (C == 0 && G1 == 0), sname, " shape ", s.sizes(),
              " must evenly tile ", tname, " of shape ", t.sizes(), " (each dim a divisor of ", tname, "'s)");
  return {ok ? R / G0 : 1, ok ? C / G1 : 1};
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& a, int64_t N,
                       const char* aname = "a") {
  if (!bias.has_value()) return;
  check_float_input(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [N] = [", N, "], got ", bias->sizes());
  check_same_device(a, *bias, aname, "bias");
}

struct Fp8MmBlocks {
  MiniFloat fa, fb;
  std::array<int64_t, 2> ba, bb;  // block sizes of a and b
};

inline Fp8MmBlocks check_fp8_mm_args(const at::Tensor& a, const at::Tensor& a_scale, at::ScalarType a_dtype,
                                     const at::Tensor& b, const at::Tensor& b_scale, at::ScalarType b_dtype,
                                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_dtype(a, at::kByte, "a");
  check_dtype(b, at::kByte, "b");
  check_dim(a, 2, "a");
  check_dim(b, 2, "b");
  check_float_out_dtype(out_dtype);
  TORCH_CHECK(b.size(1) == a.size(1), "b must have shape [N, K] with K=", a.size(1), " (a's dim 1), got ", b.sizes());
  Fp8MmBlocks r;
  r.fa = minifloat_format(fp8_format_id(a_dtype, "a_dtype"));
  r.fb = minifloat_format(fp8_format_id(b_dtype, "b_dtype"));
  r.ba = blocks_from_grid(a, a_scale, "a", "a_scale");
  r.bb = blocks_from_grid(b, b_scale, "b", "b_scale");
  check_bias(bias, a, b.size(0));
  check_same_device(a, a_scale, "a", "a_scale");
  check_same_device(a, b, "a", "b");
  check_same_device(a, b_scale, "a", "b_scale");
  return r;
}

// fp8_weight_only_mm: x float [M, K]; w [N, K] fp8 bits of w_dtype with the scale grid w_scale. Returns w's block
// sizes.
inline std::array<int64_t, 2> check_fp8_weight_only_args(const at::Tensor& x, const at::Tensor& w,
                                                         const at::Tensor& w_scale, at::ScalarType w_dtype,
                                                         const std::optional<at::Tensor>& bias) {
  check_float_input(x, "x");
  check_dim(x, 2, "x");
  check_dtype(w, at::kByte, "w");
  check_dim(w, 2, "w");
  TORCH_CHECK(w.size(1) == x.size(1), "w must have shape [N, K] with K=", x.size(1), " (x's dim 1), got ", w.sizes());
  fp8_format_id(w_dtype, "w_dtype");
  const auto bb = blocks_from_grid(w, w_scale, "w", "w_scale");
  check_bias(bias, x, w.size(0), "x");
  check_same_device(x, w, "x", "w");
  check_same_device(x, w_scale, "x", "w_scale");
  return bb;
}

// ---- fp4 ----
// fp4 element name -> float8.h format id (the CPU and CUDA entry points both use this one lookup)
inline int fp4_element_id(c10::string_view element) {
  const int id = minifloat_id(element, 4);
  TORCH_CHECK(id >= 0, "element must be ", minifloat_names(4, true), ", got '", std::string(element), "'");
  return id;
}

inline MiniFloat fp4_element_format(c10::string_view element) { return minifloat_format(fp4_element_id(element)); }

// true for NVFP4 (e4m3 scales of 16 elements), false for MXFP4 (e8m0 scales of 32)
inline bool fp4_is_nv(c10::string_view format) {
  if (format == "mxfp4") return false;
  if (format == "nvfp4") return true;
  TORCH_CHECK(false, "format must be 'mxfp4' or 'nvfp4', got '", std::string(format), "'");
}

inline void check_fp4_encode_input(const at::Tensor& x) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "the last dim of x must be even to pack two fp4 per byte, got ",
              "shape ", x.sizes());
}

inline void check_fp4_decode_input(const at::Tensor& packed, at::ScalarType out_dtype) {
  check_dtype(packed, at::kByte, "packed");
  TORCH_CHECK(packed.dim() >= 1, "packed must have at least 1 dim, got a 0-d tensor");
  check_float_out_dtype(out_dtype);
}

inline void check_quantize_fp4_input(const at::Tensor& x, c10::string_view format, int64_t B) {
  check_float_input(x, "x");
  check_dim(x, 2, "x");
  TORCH_CHECK(x.size(1) % B == 0, "the last dim of x (", x.size(1), ") must be a multiple of the ",
              std::string(format), " block size ", B);
}

inline void check_global_scale(const at::Tensor& g, const char* name) {
  check_dtype(g, at::kFloat, name);
  TORCH_CHECK(g.numel() == 1, name, " must have one element (a per-tensor fp32 scale), got shape ", g.sizes());
}

// checks packed [R, K/2] against scale [R, K/B]; returns K
inline int64_t check_fp4_operand(const at::Tensor& packed, const at::Tensor& scale, int64_t B, const char* pname,
                                 const char* sname) {
  check_dtype(packed, at::kByte, pname);
  check_dim(packed, 2, pname);
  check_dtype(scale, at::kByte, sname);
  const int64_t R = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % B == 0, "the unpacked last dim of ", pname, " (", K, ") must be a multiple of the block size ", B);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == R && scale.size(1) == K / B, sname, " must have shape [", R, ", ",
              K / B, "] (one scale per ", B, " elements of ", pname, " ", packed.sizes(), " unpacked), got ",
              scale.sizes());
  check_same_device(packed, scale, pname, sname);
  return K;
}

// fp4_mm: returns K (checks a, b, scales, global scales, bias)
inline int64_t check_fp4_mm_args(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_global_scale,
                                 const at::Tensor& b, const at::Tensor& b_scale, const at::Tensor& b_global_scale,
                                 int64_t B, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_float_out_dtype(out_dtype);
  const int64_t K = check_fp4_operand(a, a_scale, B, "a", "a_scale");
  const int64_t Kb = check_fp4_operand(b, b_scale, B, "b", "b_scale");
  TORCH_CHECK(Kb == K, "b must have shape [N, K/2] = [", b.size(0), ", ", K / 2, "] to match a, got ", b.sizes());
  check_same_device(a, b, "a", "b");
  check_global_scale(a_global_scale, "a_global_scale");
  check_global_scale(b_global_scale, "b_global_scale");
  check_bias(bias, a, b.size(0));
  return K;
}

// fp4_weight_only_mm: x float [M, K]; w packed [N, K/2] with block scales; returns K.
inline int64_t check_fp4_weight_only_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                          const at::Tensor& w_global_scale, int64_t B,
                                          const std::optional<at::Tensor>& bias) {
  check_float_input(x, "x");
  check_dim(x, 2, "x");
  const int64_t K = check_fp4_operand(w, w_scale, B, "w", "w_scale");
  TORCH_CHECK(K == x.size(1), "w must have shape [N, K/2] = [", w.size(0), ", ", x.size(1) / 2, "] to match x's K=",
              x.size(1), ", got ", w.sizes());
  check_same_device(x, w, "x", "w");
  check_global_scale(w_global_scale, "w_global_scale");
  check_bias(bias, x, w.size(0), "x");
  return K;
}

}  // namespace qkernels
