// Argument checks shared by the CPU and CUDA entry points. Messages name the argument and what was expected.
#pragma once
#include <torch/library.h>

#include <ATen/ATen.h>

namespace qkernels {

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.scalar_type() == dt, name, " must have dtype ", dt, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), name_a, " and ", name_b, " must be on the same device, got ", a.device(),
              " and ", b.device());
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8], got ", bits);
}

// w [..., K] with groups of group_size along K; scale [..., K / group_size].
inline void check_groups(const at::Tensor& w, int64_t group_size, const char* name) {
  TORCH_CHECK(w.dim() >= 1, name, " must have at least 1 dim, got a 0-d tensor");
  const int64_t K = w.size(-1);
  TORCH_CHECK(group_size > 0, "group_size must be positive, got ", group_size);
  TORCH_CHECK(K % group_size == 0, "group_size ", group_size, " must divide the last dim of ", name, " (", K, ")");
}

inline void check_group_params(const at::Tensor& w, const at::Tensor& p, int64_t group_size, const char* wname,
                               const char* pname) {
  auto expected = w.sizes().vec();
  expected.back() = w.size(-1) / group_size;
  TORCH_CHECK(p.sizes().vec() == expected, pname, " must have shape ", at::IntArrayRef(expected), " for ", wname,
              " of shape ", w.sizes(), " and group_size ", group_size, ", got ", p.sizes());
  check_same_device(w, p, wname, pname);
}

}  // namespace qkernels
