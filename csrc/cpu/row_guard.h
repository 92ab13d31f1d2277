// The range guard of the CPU GEMMs: the fast paths (register kernels, int16 activations, dequantize + sgemm) work in
// fp32 with their own scaling orders, so near fp32's range ends they can overflow, or lose bits in subnormals, where
// the reference (qkernels/reference, fp64 accumulation) does not; and a product inf * 0 or a zero-point correction
// inf - inf turns an inf of x into NaN where the reference gives +-inf. Rather than slow every kernel down, the guard
// keeps the kernels on inputs where fp32 is safe and repairs, exactly, the few outputs where it was not:
//
//  * before: one pass over x (O(M K), nothing next to the weights' O(N K)) classifies each row: NaN, inf, all zero,
//    or finite with max |x| = a. Rows with a outside [2^-64, 2^64) are handed to the kernel rescaled by 2^-E
//    (E = floor(log2 a), exact powers of two), so no kernel sees activations near fp32's range ends;
//  * after: out[m, n] of a finite row is kept when it is finite and |out| >= 2^-90 (then multiplied back by 2^E,
//    in double, rounded once). Otherwise (an overflow on the way, or a result so small that subnormal roundings
//    could matter: error <= K * 2^-149 against |out| >= 2^-90 leaves K * 2^-59) it is recomputed exactly: fp64
//    products and sum of the unscaled x with the weight decoded as the reference decodes it (`exact`). Rows with a
//    NaN are NaN (every reference product is); rows with an inf are recomputed exactly (the reference's NaN where
//    inf meets a zero weight or an inf of the other sign, +-inf otherwise). All-zero rows keep the kernel's zeros
//    (NaN where a weight is non-finite is recomputed too).
// The check costs one pass over out (O(M N)); the exact path runs only for flagged outputs, O(K) each.
// What stays approximate: elements more than ~2^60 below their row's largest |x| may be flushed to 0 by a kernel's
// block scaling, which matters only if their weights are larger by as much.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/MaybeOwned.h>
#include <c10/util/SmallVector.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "amax.h"

namespace qkernels {
namespace cpu {

class RowGuard {
 public:
  static constexpr int kMaxExp = 64;                    // rows with max |x| outside [2^-64, 2^64) are rescaled
  static constexpr uint32_t kTinyBits = (127 - 90) << 23;  // 2^-90: smaller outputs are recomputed

  // x: float [M, K] (fp32 / bf16 / fp16 / fp64), the activations the kernel multiplies.
  explicit RowGuard(const at::Tensor& x) : x_(x), M_(x.size(0)), K_(x.size(1)) {
    state_.assign(M_, kFinite);
    exp_.assign(M_, 0);
    const c10::MaybeOwned<at::Tensor> xc = x.expect_contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_guard", [&] {
      const scalar_t* p = xc->data_ptr<scalar_t>();
      for (int64_t m = 0; m < M_; ++m) {
        const AbsBitsMax r = abs_bits_max(p + m * K_, K_);
        if (r.all > kInfBits) {
          state_[m] = kNaN;
        } else if (r.all == kInfBits) {
          state_[m] = kInf;
        } else if (r.finite == 0) {
          state_[m] = kZero;
        } else {
          const int e = std::ilogb(bits_f32((uint32_t)r.finite));
          if (e < -kMaxExp || e >= kMaxExp) exp_[m] = e, rescaled_ = true;
        }
      }
    });
  }

  // Whether some row is rescaled (then run the kernel on rescaled_x()).
  bool rescaled() const { return rescaled_; }

  // fp32 copy of x with every rescaled row multiplied by 2^-E (in double: 2^-E may not be an fp32 number).
  at::Tensor rescaled_x() const {
    auto xf = x_.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
    float* p = xf.data_ptr<float>();
    for (int64_t m = 0; m < M_; ++m) {
      if (exp_[m] == 0) continue;
      for (int64_t k = 0; k < K_; ++k) p[m * K_ + k] = (float)std::ldexp((double)p[m * K_ + k], -exp_[m]);
    }
    return xf;
  }

  // out: fp32 [M, N] contiguous, what the kernel computed (on rescaled_x() where rescaled()). Applies the rows'
  // factors 2^E and recomputes the flagged outputs: exact(xrow, n) -> double, xrow the fp64 row of the original x.
  template <typename Exact>
  void finish(at::Tensor& out, const Exact& exact) const {
    finish(out.data_ptr<float>(), out.size(1), exact);
  }

  // The same on a raw fp32 [M, N] row-major buffer (the GEMMs' per-thread output scratch).
  template <typename Exact>
  void finish(float* o, int64_t N, const Exact& exact) const {
    std::vector<std::pair<int64_t, int64_t>> todo;
    for (int64_t m = 0; m < M_; ++m) {
      float* row = o + m * N;
      if (state_[m] == kNaN) {
        for (int64_t n = 0; n < N; ++n) row[n] = std::nanf("");
        continue;
      }
      if (state_[m] == kInf) {
        for (int64_t n = 0; n < N; ++n) todo.emplace_back(m, n);
        continue;
      }
      // finite rows: |out| in [2^-90, FLT_MAX] as one unsigned compare on the bits (vectorizes); zero rows: finite
      const uint32_t lo = state_[m] == kZero ? 0u : kTinyBits, span = 0x7F7FFFFFu - lo;
      bool bad = false;
      for (int64_t n = 0; n < N; ++n) bad |= ((f32_bits(row[n]) & 0x7FFFFFFFu) - lo) > span;
      if (bad) {
        for (int64_t n = 0; n < N; ++n)
          if (((f32_bits(row[n]) & 0x7FFFFFFFu) - lo) > span) todo.emplace_back(m, n);
      }
      if (exp_[m] != 0) {
        const double f = std::ldexp(1.0, exp_[m]);
        for (int64_t n = 0; n < N; ++n) row[n] = (float)((double)row[n] * f);
      }
    }
    if (todo.empty()) return;
    const auto xd = x_.to(at::kDouble).contiguous();
    const double* xp = xd.data_ptr<double>();
    at::parallel_for(0, (int64_t)todo.size(), std::max<int64_t>(1, 65536 / std::max<int64_t>(K_, 1)),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i) {
                         const auto [m, n] = todo[i];
                         o[m * N + n] = (float)exact(xp + m * K_, n);
                       }
                     });
  }

 private:
  enum State : uint8_t { kFinite, kZero, kInf, kNaN };
  at::Tensor x_;
  int64_t M_, K_;
  // inline storage for decode-sized M: no heap allocation per call
  c10::SmallVector<uint8_t, 16> state_;
  c10::SmallVector<int, 16> exp_;
  bool rescaled_ = false;
};

}  // namespace cpu
}  // namespace qkernels
