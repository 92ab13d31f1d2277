// CPU decode attention: one query per sequence over a KV cache (the single-token step of a decoder), with
// grouped-query heads. Only the positions the mask leaves open are read, so the cost follows the tokens in the cache,
// not the static cache's length (a compiled eager attention walks every slot: docs/decode.md). Semantics:
// qkernels/reference/attention.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_kernels.h"
#include "cpu_dispatch.h"

namespace qkernels {
namespace {

void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [batch, heads, head_dim], got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "k and v must be [batch, kv_heads, length, head_dim], got ", k.dim(),
              " and ", v.dim(), " dims");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q must be a floating dtype, got ", q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0), "k's batch (", k.size(0), ") must equal q's (", q.size(0), ")");
  TORCH_CHECK(k.size(3) == q.size(2), "k's head_dim (", k.size(3), ") must equal q's (", q.size(2), ")");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "q's heads (", q.size(1),
              ") must be a multiple of k's kv_heads (", k.size(1), ")");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                "mask must be [batch, length] = [", q.size(0), ", ", k.size(2), "], got ", mask->sizes());
    TORCH_CHECK(at::isFloatingType(mask->scalar_type()), "mask must be a floating (additive) dtype, got ",
                mask->scalar_type());
  }
}

// Grow-only per-thread buffers: the kernel runs once per layer per token, so it must not allocate (or fill) B * L
// entries on every call.
template <typename T>
T* grow(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// The open positions of one sequence's mask row (see attention_kernels.h): closed where m is -inf or at most its
// dtype's lowest finite value (transformers' masks); fp64 masks close only -inf, as the reference's do.
template <typename M>
int64_t open_positions_portable(const M* m, int64_t L, int32_t* idx, float* madd) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) {
    const bool closed = std::is_same<M, double>::value
                            ? static_cast<double>(m[l]) == -std::numeric_limits<double>::infinity()
                            : static_cast<float>(m[l]) <= static_cast<float>(std::numeric_limits<M>::lowest());
    if (closed) continue;  // NaN stays open: it reaches the output as in the reference
    idx[n] = (int32_t)l;
    madd[n++] = static_cast<float>(m[l]);
  }
  return n;
}

// The portable kernel for one (sequence, kv head): what CPUs without AVX2 (and QKERNELS_CPU_ISA=scalar) run.
// Scratch: qf G * D floats, row D + G floats, s G * n floats.
template <typename T>
void kv_head_portable(const T* q, const T* kb, const T* vb, int64_t G, int64_t D, const int32_t* idx,
                      const float* madd, int64_t n, float sc, float* qf, float* row, float* s, T* o) {
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]);
  // scores s[g, i] = scale * q_g . k_l + mask_l over the open positions l = idx[i]
  for (int64_t i = 0; i < n; ++i) {
    const T* kr = kb + (idx ? (int64_t)idx[i] : i) * D;
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(kr[d]);
    const float add = madd ? madd[i] : 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      // 8 independent partial sums: vectorizable without reassociating one sum (no -ffast-math here)
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        for (int j = 0; j < 8; ++j) part[j] += qg[d + j] * row[d + j];
      float dot = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
      for (; d < D; ++d) dot += qg[d] * row[d];
      s[g * n + i] = dot * sc + add;
    }
  }
  // softmax per head (max subtracted; all scores -inf: max 0, so every weight is 0), then the weighted v rows
  float* denom = row + D;  // G floats after the row
  for (int64_t g = 0; g < G; ++g) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[g * n + i]);
    if (mx == -std::numeric_limits<float>::infinity()) mx = 0.f;
    denom[g] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(s[g * n + i] - mx);
      s[g * n + i] = p;
      denom[g] += p;
    }
  }
  float* acc = qf;  // q is not needed any more
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const T* vr = vb + (idx ? (int64_t)idx[i] : i) * D;
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(vr[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float p = s[g * n + i];
      float* a = acc + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
    }
  }
  // no weight at all (no open position, or every score -inf): zeros, the reference's convention; NaN stays NaN
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d)
      o[g * D + d] = static_cast<T>(denom[g] == 0.f ? 0.f : acc[g * D + d] / denom[g]);
}

template <typename T>
constexpr cpu::AttnElem attn_elem() {
  return std::is_same<T, float>::value ? cpu::AttnElem::kF32
         : std::is_same<T, c10::BFloat16>::value ? cpu::AttnElem::kBF16
                                                 : cpu::AttnElem::kF16;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, double scale) {
  check_decode_attention_args(q, k, v, mask, scale);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = k.size(2), G = H / KVH;
  TORCH_CHECK(L < std::numeric_limits<int32_t>::max() - 8, "k's length must be below 2^31 - 8, got ", L);
  auto out = at::empty({B, H, D}, q.options());
  if (out.numel() == 0) return out;
  const c10::MaybeOwned<at::Tensor> qc = q.expect_contiguous(), kc = k.expect_contiguous(),
                                    vc = v.expect_contiguous();
  const bool avx2 = q.scalar_type() != at::kDouble && cpu::use_avx2();
  // Each sequence's open positions and their mask values, compacted (rows of L + 8: the AVX2 pass stores whole
  // vectors), read in the mask's own dtype: no converted copy, and with AVX2 a run of open positions costs two
  // stores per 8. Without a mask every position is open (idx nullptr).
  thread_local std::vector<int32_t> idx_buf;
  thread_local std::vector<float> madd_buf;
  thread_local std::vector<int64_t> count_buf;
  const int64_t ldm = L + 8;
  int32_t* idx = nullptr;
  float* madd = nullptr;
  int64_t* count = grow(count_buf, (size_t)B);
  std::fill(count, count + B, L);
  if (mask.has_value()) {
    idx = grow(idx_buf, (size_t)(B * ldm));
    madd = grow(madd_buf, (size_t)(B * ldm));
    const c10::MaybeOwned<at::Tensor> mc = mask->expect_contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mc->scalar_type(), "decode_attention_mask", [&] {
      const scalar_t* m = mc->data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        if constexpr (!std::is_same<scalar_t, double>::value) {
          if (avx2) {
            count[b] = cpu::attention_open_positions_avx2(m + b * L, attn_elem<scalar_t>(), L,
                                                          static_cast<float>(std::numeric_limits<scalar_t>::lowest()),
                                                          idx + b * ldm, madd + b * ldm);
            continue;
          }
        }
        count[b] = open_positions_portable(m + b * L, L, idx + b * ldm, madd + b * ldm);
      }
    });
  }
  const float sc = (float)scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* Q = qc->data_ptr<scalar_t>();
    const scalar_t* K = kc->data_ptr<scalar_t>();
    const scalar_t* V = vc->data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    // one task per (sequence, kv head): its G query heads share every k / v row read
    auto run = [&](int64_t t0, int64_t t1) {
      thread_local std::vector<float> scratch;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / KVH, kh = t % KVH, n = count[b];
        const scalar_t* kb = K + (b * KVH + kh) * L * D;
        const scalar_t* vb = V + (b * KVH + kh) * L * D;
        const scalar_t* qb = Q + (b * H + kh * G) * D;
        scalar_t* ob = O + (b * H + kh * G) * D;
        const int32_t* ib = idx ? idx + b * ldm : nullptr;
        const float* mb = madd ? madd + b * ldm : nullptr;
        if constexpr (!std::is_same<scalar_t, double>::value) {
          if (avx2) {
            float* w = grow(scratch, cpu::decode_attention_scratch_floats(G, D, n));
            // the next task's k block, when it reads the same open positions (same sequence), for prefetching
            const scalar_t* next_k = kh + 1 < KVH && t + 1 < t1 ? kb + L * D : nullptr;
            cpu::decode_attention_kv_head_avx2(qb, kb, vb, attn_elem<scalar_t>(), G, D, ib, mb, n, sc, w, ob, next_k);
            continue;
          }
        }
        float* w = grow(scratch, (size_t)(G * D + D + G + G * n));
        kv_head_portable(qb, kb, vb, G, D, ib, mb, n, sc, w, w + G * D, w + G * D + D + G, ob);
      }
    };
    // one sequence's few kv heads are microseconds of work: no parallel region for them
    if (B * KVH * L * D < (1 << 18) || at::get_num_threads() == 1) run(0, B * KVH);
    else at::parallel_for(0, B * KVH, 1, run);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace qkernels
