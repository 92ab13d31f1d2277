// The few ggml.c symbols ggml-quants.c needs, so benchmarks/gguf_llamacpp_oracle.py can build llama.cpp's quantizers
// alone: row sizes of the block types we compare (ggml_row_size) and an abort handler.
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
static const int BS[40] = {[2]=32,[3]=32,[6]=32,[7]=32,[8]=32,[10]=256,[11]=256,[12]=256,[13]=256,[14]=256,[39]=32};
static const int TS[40] = {[2]=18,[3]=20,[6]=22,[7]=24,[8]=34,[10]=84,[11]=110,[12]=144,[13]=176,[14]=210,[39]=17};
size_t ggml_row_size(int type, int64_t ne) { return (size_t)(ne / BS[type] * TS[type]); }
size_t ggml_type_size(int type) { return TS[type]; }
const char * ggml_type_name(int type) { return "?"; }
