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

  // ---- GGUF / llama.cpp block formats (csrc/cpu/gguf.cpp, reference: qkernels/reference/gguf.py) ----
  // type is the ggml type id (Q4_0=2 ... Q6_K=14, MXFP4=39); data is uint8 [rows, cols/block*type_size], ggml's blocks.
  // x [rows, cols] float -> blocks, llama.cpp's reference quantizer; imatrix [cols] = importance weights (K-quants).
  m.def("gguf_quantize(Tensor x, int type, Tensor? imatrix) -> Tensor");
  // blocks -> [rows, cols] in out_dtype, bit-identical to ggml's dequantize_row_* (decoded in fp32).
  m.def("gguf_dequantize(Tensor data, int type, int rows, int cols, ScalarType out_dtype) -> Tensor");
  // x [M, K] float @ dequant(data [N, K/block*type_size])^T -> [M, N] in x's dtype (fp32 accumulation).
  m.def("gguf_mm(Tensor x, Tensor data, int type, int N, int K) -> Tensor");
}
