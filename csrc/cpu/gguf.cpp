// CPU kernels for GGUF block formats: decode and encode (all types, llama.cpp's reference search) and the
// dequant-GEMM gguf_mm. Per-block decode math: qkernels/gguf.h (shared with future CUDA kernels); encoders:
// gguf_encode.h. Semantics: qkernels/reference/gguf.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "gguf_encode.h"
#include "qkernels/check.h"
#include "qkernels/gguf.h"

namespace qkernels {
namespace {

using namespace gguf;

// Rows of W per dequantized tile in gguf_mm: 32 x 4096 fp32 = 512 KiB, about one L2 (as in int_gemm.cpp).
constexpr int64_t kTileN = 32;

// "F32=0, F16=1, ...": the types of QK_GGUF_TYPES, named in every type error (tests/test_format_tables.py reads it)
const std::string& supported_types() {
  static const std::string s = [] {
    std::string r;
#define QK_GGUF_NAME(name, id, bs, ts) r += (r.empty() ? "" : ", ") + std::string(#name "=" #id);
    QK_GGUF_TYPES(QK_GGUF_NAME)
#undef QK_GGUF_NAME
    return r;
  }();
  return s;
}

void check_type(int64_t type) {
  TORCH_CHECK(block_size((int)type) > 0, "type must be a supported ggml type id (", supported_types(), "), got ",
              type);
}

// data must be uint8 [rows, cols / block * type_size] on CPU, cols a multiple of the block size.
void check_data(const at::Tensor& data, int64_t type, int64_t rows, int64_t cols, const char* rname,
                const char* cname) {
  check_type(type);
  check_dtype(data, at::kByte, "data");
  check_dim(data, 2, "data");
  TORCH_CHECK(rows >= 0 && cols >= 0, rname, " and ", cname, " must be non-negative, got ", rows, " and ", cols);
  const int bs = block_size((int)type), ts = type_size((int)type);
  TORCH_CHECK(cols % bs == 0, cname, " (", cols, ") must be a multiple of the block size ", bs, " of type ", type);
  TORCH_CHECK(data.size(0) == rows && data.size(1) == cols / bs * ts, "data must have shape [", rows, ", ",
              cols / bs * ts, "] for ", rows, " x ", cols, " values of type ", type, ", got ", data.sizes());
}

// Decodes row n (cols values) of contiguous block data into dst.
inline void decode_row(const uint8_t* data, int type, int64_t n, int64_t cols, float* dst) {
  const int bs = block_size(type), ts = type_size(type);
  const int64_t nb = cols / bs;
  const uint8_t* row = data + n * nb * ts;
  for (int64_t b = 0; b < nb; ++b) decode_block(type, row + b * ts, dst + b * bs);
}

at::Tensor gguf_dequantize_cpu(const at::Tensor& data, int64_t type, int64_t rows, int64_t cols,
                               at::ScalarType out_dtype) {
  check_data(data, type, rows, cols, "rows", "cols");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf ||
                  out_dtype == at::kDouble,
              "out_dtype must be a floating dtype, got ", out_dtype);
  auto dc = data.contiguous();
  auto out = at::empty({rows, cols}, data.options().dtype(at::kFloat));
  const uint8_t* d = dc.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode_row(d, (int)type, r, cols, o + r * cols);
  });
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

at::Tensor gguf_quantize_cpu(const at::Tensor& x, int64_t type, const std::optional<at::Tensor>& imatrix) {
  check_type(type);
  check_float_input(x, "x");
  check_dim(x, 2, "x");
  const int t = (int)type;
  const int bs = block_size(t), ts = type_size(t);
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(cols % bs == 0, "the last dim of x (", cols, ") must be a multiple of the block size ", bs,
              " of type ", type);
  TORCH_CHECK(x.numel() == 0 || at::isfinite(x).all().item<bool>(), "x contains NaN or inf; GGUF quantization needs "
              "finite values");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t nb = cols / bs;
  auto out = at::empty({rows, nb * ts}, x.options().dtype(at::kByte));
  if (t == F32 || t == F16 || t == BF16) {
    auto conv = t == F32 ? xf : xf.to(t == F16 ? at::kHalf : at::kBFloat16);
    out.copy_(conv.view(at::kByte).reshape({rows, nb * ts}));
    return out;
  }
  at::Tensor qw;
  if (imatrix.has_value()) {
    check_dim(*imatrix, 1, "imatrix");
    TORCH_CHECK(imatrix->size(0) == cols, "imatrix must have shape [", cols, "] (one weight per column of x), got ",
                imatrix->sizes());
    qw = imatrix->to(at::kFloat).contiguous();  // only the K-quant encoders read it (as llama.cpp's do)
  }
  const float* xp = xf.data_ptr<float>();
  const float* wp = qw.defined() ? qw.data_ptr<float>() : nullptr;
  uint8_t* op = out.data_ptr<uint8_t>();
  std::atomic<bool> unsupported{false};
  // the K-quant searches cost ~100x a 32-block's encoder: smaller grains there
  at::parallel_for(0, rows * nb, bs >= 256 ? 16 : 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!encode_block(t, xp + b * bs, wp ? wp + (b % nb) * bs : nullptr, op + b * ts)) {
        unsupported = true;
        return;
      }
    }
  });
  TORCH_CHECK(!unsupported, "the C++ encoder does not implement type ", type, " (supported: ", supported_types(), ")");
  return out;
}

// x [M, K] @ dequant(data [N, K/bs*ts])^T: decode kTileN weight rows into an fp32 tile, then BLAS sgemm. The decode
// is amortised over the M rows; for M = 1 the cost is one pass over the blocks (memory bound, like llama.cpp).
at::Tensor gguf_mm_cpu(const at::Tensor& x, const at::Tensor& data, int64_t type, int64_t N, int64_t K) {
  check_float_input(x, "x");
  check_dim(x, 2, "x");
  TORCH_CHECK(x.size(1) == K, "x must have shape [M, K] with K=", K, ", got ", x.sizes());
  check_data(data, type, N, K, "N", "K");
  check_same_device(x, data, "x", "data");
  const int64_t M = x.size(0);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  if (K == 0) return out.zero_().to(x.scalar_type());
  auto xf = x.to(at::kFloat).contiguous();
  auto dc = data.contiguous();
  const uint8_t* d = dc.data_ptr<uint8_t>();
  const int64_t ntiles = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN, n1 = std::min(N, n0 + kTileN);
      auto tile = at::empty({n1 - n0, K}, xf.options());
      float* tp = tile.data_ptr<float>();
      for (int64_t n = n0; n < n1; ++n) decode_row(d, (int)type, n, K, tp + (n - n0) * K);
      out.narrow(1, n0, n1 - n0).copy_(at::mm(xf, tile.t()));
    }
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("gguf_dequantize", &gguf_dequantize_cpu);
  m.impl("gguf_quantize", &gguf_quantize_cpu);
  m.impl("gguf_mm", &gguf_mm_cpu);
}

}  // namespace qkernels
