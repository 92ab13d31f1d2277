// Emulated low-precision GEMM shared by the fp8 and fp4 CPU kernels: the weight decoded to fp32 (exactly, with its
// scales applied) and the BLAS sgemm behind at::mm accumulating. x comes decoded by the caller; the weight is
// decoded (small M) in tiles of kEmuTileN rows (32 x 4096 fp32 = 512 KiB, about one L2) so the tile is still cached
// when sgemm reads it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

namespace qkernels {
namespace cpu {

constexpr int64_t kEmuTileN = 32;
// Above this many rows of x the weight is decoded whole and multiplied with one sgemm.
constexpr int64_t kEmuSmallM = 16;

// The epilogue of every fp8 / fp4 CPU GEMM: out fp32 [M, N] (+ bias in fp32), rounded once to out_dtype.
inline at::Tensor finish_mm(at::Tensor& out, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  if (bias.has_value()) out.add_(bias->to(at::kFloat).reshape({1, out.size(1)}));
  return out.to(out_dtype);
}

// af: the activations, already decoded to fp32 [M, K] (contiguous); decode_b(n, dst[K]) writes one fp32 weight row.
// Returns af @ W^T in fp32 [M, N] (the caller's row guard, then finish_mm).
template <typename DecodeB>
at::Tensor emulated_mm(const at::Tensor& af, int64_t N, const DecodeB& decode_b) {
  const int64_t M = af.size(0), K = af.size(1);
  auto fopts = af.options();
  auto out = at::zeros({M, N}, fopts);
  if (M > 0 && N > 0 && K > 0) {
    if (M > kEmuSmallM) {
      // prefill-sized M: one big sgemm (itself multithreaded) beats per-tile calls
      auto bf = at::empty({N, K}, fopts);
      float* bp = bf.data_ptr<float>();
      at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) decode_b(n, bp + n * K);
      });
      at::mm_out(out, af, bf.t());
    } else {
      const int64_t ntiles = (N + kEmuTileN - 1) / kEmuTileN;
      at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * kEmuTileN, n1 = std::min(N, n0 + kEmuTileN);
          auto tile = at::empty({n1 - n0, K}, fopts);
          float* tp = tile.data_ptr<float>();
          for (int64_t n = n0; n < n1; ++n) decode_b(n, tp + (n - n0) * K);
          out.narrow(1, n0, n1 - n0).copy_(at::mm(af, tile.t()));
        }
      });
    }
  }
  return out;
}

}  // namespace cpu
}  // namespace qkernels
