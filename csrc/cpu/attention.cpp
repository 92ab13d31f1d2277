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
#include <vector>

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

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, double scale) {
  check_decode_attention_args(q, k, v, mask, scale);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = k.size(2), G = H / KVH;
  auto out = at::empty({B, H, D}, q.options());
  if (out.numel() == 0) return out;
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  // which positions the mask closes (-inf or its dtype's lowest value: transformers' masks) and its values in fp32,
  // read in the mask's own dtype (no converted copy: this runs once per layer per token)
  thread_local std::vector<uint8_t> open;
  thread_local std::vector<float> madd;
  open.assign(B * L, 1);
  madd.assign(B * L, 0.f);
  if (mask.has_value()) {
    auto mc = mask->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mc.scalar_type(), "decode_attention_mask", [&] {
      const float lowest = static_cast<float>(std::numeric_limits<scalar_t>::lowest());  // fp64: -inf below
      const scalar_t* m = mc.data_ptr<scalar_t>();
      for (int64_t i = 0; i < B * L; ++i) {
        const float f = static_cast<float>(m[i]);
        open[i] = f <= lowest ? 0 : 1;  // NaN stays open: it reaches the output as in the reference
        madd[i] = f;
      }
    });
  }
  const float* mp = madd.data();
  const uint8_t* op = open.data();
  const float sc = (float)scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* Q = qc.data_ptr<scalar_t>();
    const scalar_t* K = kc.data_ptr<scalar_t>();
    const scalar_t* V = vc.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    // one task per (sequence, kv head): its G query heads share every k / v row read
    auto run = [&](int64_t t0, int64_t t1) {
      thread_local std::vector<float> qf, row, acc, s, denom;
      thread_local std::vector<int64_t> idx;
      qf.resize(G * D);
      row.resize(D);
      acc.resize(G * D);
      s.resize(G * L);
      denom.resize(G);
      idx.resize(L);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / KVH, kh = t % KVH;
        const scalar_t* kb = K + (b * KVH + kh) * L * D;
        const scalar_t* vb = V + (b * KVH + kh) * L * D;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(Q[(b * H + kh * G + g) * D + d]);
        int64_t n = 0;
        for (int64_t l = 0; l < L; ++l)
          if (op[b * L + l]) idx[n++] = l;
        // scores s[g, i] = scale * q_g . k_l + mask_l over the open positions l = idx[i]
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* kr = kb + idx[i] * D;
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(kr[d]);
          const float add = mp[b * L + idx[i]];
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            // 8 independent partial sums: vectorizable without reassociating one sum (no -ffast-math here)
            float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            int64_t d = 0;
            for (; d + 8 <= D; d += 8)
              for (int j = 0; j < 8; ++j) part[j] += qg[d + j] * row[d + j];
            float dot = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
            for (; d < D; ++d) dot += qg[d] * row[d];
            s[g * L + i] = dot * sc + add;
          }
        }
        // softmax per head (max subtracted), then the weighted sum of the open v rows
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(denom.begin(), denom.end(), 0.f);
        for (int64_t g = 0; g < G; ++g) {
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[g * L + i]);
          for (int64_t i = 0; i < n; ++i) {
            const float p = std::exp(s[g * L + i] - mx);
            s[g * L + i] = p;
            denom[g] += p;
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* vr = vb + idx[i] * D;
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(vr[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * L + i];
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          // no open position: zeros (the reference's convention), not NaN
          const float inv = n > 0 ? 1.f / denom[g] : 0.f;
          scalar_t* o = O + (b * H + kh * G + g) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
        }
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
