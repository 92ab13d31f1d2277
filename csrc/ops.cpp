// The one op library: every qkernels schema, one comment line each. Implementations register per dispatch key in
// csrc/cpu/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA); fake (meta) kernels live in qkernels/ops/<family>.py.
#include <Python.h>
#include <torch/library.h>

// `import qkernels._C` only needs a module object: loading the shared library runs the TORCH_LIBRARY registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(qkernels, m) {
  // ---- integer affine quantization (csrc/cpu/int_quant.cpp, reference: qkernels/reference/int_quant.py) ----
  // Per-group scale/zero_point of w [R, K]: group_size divides K; float_zero_point selects w ~= scale*q + min.
  m.def("choose_qparams_affine(Tensor w, int bits, int group_size, bool symmetric, bool is_signed, "
        "bool float_zero_point) -> (Tensor scale, Tensor zero_point)");
  // q = clamp(round(w / scale) + zero_point) in int8 (signed) or uint8 (unsigned) storage.
  m.def("quantize_affine(Tensor w, Tensor scale, Tensor? zero_point, int bits, int group_size, bool is_signed, "
        "bool float_zero_point) -> Tensor");
  // w = scale * (q - zero_point) (or scale * q + min in the float zero-point domain), in out_dtype.
  m.def("dequantize_affine(Tensor q, Tensor scale, Tensor? zero_point, int group_size, bool float_zero_point, "
        "ScalarType out_dtype) -> Tensor");
  // int4 -> uint8, two per byte along the last dim, element 2i in the low nibble.
  m.def("pack_int4(Tensor q) -> Tensor");
  // uint8 -> int8 [-8, 7] (is_signed) or uint8 [0, 15], inverse of pack_int4.
  m.def("unpack_int4(Tensor packed, bool is_signed) -> Tensor");

  // ---- integer dequant-GEMMs (csrc/cpu/int_gemm.cpp, reference: qkernels/reference/int_gemm.py) ----
  // W4A16: x [M, K] float @ dequant(packed_w [N, K/2] uint8, scale/zero_point [N, K/group_size])^T -> [M, N].
  m.def("int4_weight_only_mm(Tensor x, Tensor packed_w, Tensor scale, Tensor? zero_point, int group_size, "
        "bool is_signed) -> Tensor");
  // W8A16: x [M, K] float @ (q_w [N, K] int8 * scale [N])^T -> [M, N].
  m.def("int8_weight_only_mm(Tensor x, Tensor q_w, Tensor scale) -> Tensor");
  // Per-token symmetric int8 quantization of x [M, K]: q in [-127, 127], scale = amax / 127 -> (q, scale [M]).
  m.def("quantize_per_token_int8(Tensor x) -> (Tensor q, Tensor scale)");
  // W8A8: per-token dynamic int8 x, int8 q_w [N, K] with w_scale [N], int32 accumulation -> [M, N] in x's dtype.
  m.def("int8_dynamic_mm(Tensor x, Tensor q_w, Tensor w_scale) -> Tensor");
  // W4A8 ("8da4w"): x [M, K] quantized per row and per weight group to int8 (symmetric, scale = amax / 127), exact
  // integer products with the int4 codes of int4_weight_only_mm's weight, scaled by x_scale[m, g] * scale[n, g]
  // per group -> [M, N] in x's dtype. x may be ragged as for int4_weight_only_mm.
  m.def("int8_dynamic_int4_mm(Tensor x, Tensor packed_w, Tensor scale, Tensor? zero_point, int group_size, "
        "bool is_signed) -> Tensor");

  // ---- build information (csrc/build_info.cpp) ----
  // The CUDA archs compiled into this build, ";"-separated as in TORCH_CUDA_ARCH_LIST ("" for a CPU-only build).
  m.def("cuda_build_archs() -> str");
  // The CPU kernels the next call runs: "avx2" (x86-64 with AVX2/FMA/F16C) or "scalar" (else, or QKERNELS_CPU_ISA=scalar).
  m.def("cpu_isa() -> str");

  // ---- fp8 casts and scaled GEMM (csrc/cpu/float8.cpp, reference: qkernels/reference/float8.py) ----
  // x [R, C] float -> (q uint8 [R, C] holding `dtype` fp8 bits, scale fp32 [R/block_rows, C/block_cols]) with
  // q = fp8(x / scale), RNE, saturating or IEEE overflow; scale given or amax(finite |x|) / fp8_max (1 if amax=0).
  m.def("quantize_fp8(Tensor x, Tensor? scale, ScalarType dtype, int block_rows, int block_cols, bool saturate) "
        "-> (Tensor q, Tensor scale)");
  // fp8 bits q uint8 [R, C] of `dtype` times scale fp32 [R/block_rows, C/block_cols] (fp32 product) -> out_dtype.
  m.def("dequantize_fp8(Tensor q, Tensor scale, ScalarType dtype, int block_rows, int block_cols, "
        "ScalarType out_dtype) -> Tensor");
  // dequant(a [M, K], a_scale [M/bm, K/bk]) @ dequant(b [N, K], b_scale [N/bn, K/bk'])^T + bias, fp32 -> out_dtype.
  m.def("fp8_mm(Tensor a, Tensor a_scale, ScalarType a_dtype, Tensor b, Tensor b_scale, ScalarType b_dtype, "
        "Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Weight-only fp8: x [M, K] float @ dequant(w [N, K], w_scale [N/bn, K/bk])^T + bias, fp32 accumulation -> x's dtype.
  m.def("fp8_weight_only_mm(Tensor x, Tensor w, Tensor w_scale, ScalarType w_dtype, Tensor? bias) -> Tensor");

  // ---- fp4 elements, MXFP4/NVFP4 block formats, scaled GEMM (csrc/cpu/float4.cpp, ref: qkernels/reference/float4.py)
  // x [..., K] float -> uint8 [..., K/2]: element ("e2m1" | "e1m2") codes, saturating RNE, element 2i in low nibble.
  m.def("fp4_encode(Tensor x, str element) -> Tensor");
  // uint8 [..., K/2] -> [..., K] out_dtype: the values of the packed element codes.
  m.def("fp4_decode(Tensor packed, str element, ScalarType out_dtype) -> Tensor");
  // x [R, K] float -> (packed uint8 [R, K/2], scale uint8 [R, K/B] (e8m0 for "mxfp4", B=32; e4m3fn for "nvfp4",
  // B=16), global_scale fp32 0-d (nvfp4: given or amax / (448 * elem_max); mxfp4: 1)).
  m.def("quantize_fp4(Tensor x, str format, str element, Tensor? global_scale) "
        "-> (Tensor packed, Tensor scale, Tensor global_scale)");
  // decode(packed [R, K/2]) * block scale (* global_scale for nvfp4) -> [R, K] out_dtype.
  m.def("dequantize_fp4(Tensor packed, Tensor scale, Tensor global_scale, str format, str element, "
        "ScalarType out_dtype) -> Tensor");
  // dequant_fp4(a [M, K/2], ...) @ dequant_fp4(b [N, K/2], ...)^T + bias, fp32 -> out_dtype [M, N].
  m.def("fp4_mm(Tensor a, Tensor a_scale, Tensor a_global_scale, Tensor b, Tensor b_scale, Tensor b_global_scale, "
        "str format, str element, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Weight-only fp4: x [M, K] float @ dequant_fp4(w [N, K/2], ...)^T + bias, fp32 accumulation -> x's dtype.
  m.def("fp4_weight_only_mm(Tensor x, Tensor w, Tensor w_scale, Tensor w_global_scale, str format, str element, "
        "Tensor? bias) -> Tensor");

  // ---- GGUF / llama.cpp block formats (csrc/cpu/gguf.cpp, reference: qkernels/reference/gguf.py) ----
  // type is the ggml type id (Q4_0=2 ... Q6_K=14, MXFP4=39); data is uint8 [rows, cols/block*type_size], ggml's blocks.
  // x [rows, cols] float -> blocks, llama.cpp's reference quantizer; imatrix [cols] = importance weights (K-quants).
  m.def("gguf_quantize(Tensor x, int type, Tensor? imatrix) -> Tensor");
  // blocks -> [rows, cols] in out_dtype, bit-identical to ggml's dequantize_row_* (decoded in fp32).
  m.def("gguf_dequantize(Tensor data, int type, int rows, int cols, ScalarType out_dtype) -> Tensor");
  // x [M, K] float @ dequant(data [N, K/block*type_size])^T -> [M, N] in x's dtype (fp32 accumulation).
  m.def("gguf_mm(Tensor x, Tensor data, int type, int N, int K) -> Tensor");

  // ---- decode attention (csrc/cpu/attention.cpp, reference: qkernels/reference/attention.py) ----
  // q [B, H, D] (one query per sequence) over k/v [B, KVH, L, D] (H % KVH == 0), additive mask [B, L] (positions at
  // -inf or the mask dtype's lowest value are skipped; none open: zeros) -> [B, H, D] in q's dtype, fp32 math.
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}
