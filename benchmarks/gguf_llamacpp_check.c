// Opens a GGUF file with llama.cpp's own reader (ggml/src/gguf.cpp) and validates every tensor's rows with
// ggml_validate_row_data, as llama.cpp's model loader does. Built by benchmarks/gguf_llamacpp_oracle.py --check.
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"
#include "gguf.h"

// gguf.cpp / ggml.c reference a few backend functions that plain CPU-memory tensors never reach
struct ggml_backend_buffer;
void ggml_backend_tensor_get(const struct ggml_tensor * t, void * d, size_t o, size_t s) { abort(); }
void ggml_backend_tensor_set(struct ggml_tensor * t, const void * d, size_t o, size_t s) { abort(); }
void ggml_backend_tensor_memset(struct ggml_tensor * t, unsigned char v, size_t o, size_t s) { abort(); }
int ggml_backend_buffer_get_usage(struct ggml_backend_buffer * b) { return 0; }

int main(int argc, char ** argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s file.gguf\n", argv[0]); return 2; }
    struct ggml_context * ctx = NULL;
    struct gguf_init_params params = { false, &ctx };
    struct gguf_context * g = gguf_init_from_file(argv[1], params);
    if (!g) { printf("llama.cpp could not read %s\n", argv[1]); return 1; }
    const int64_t n = gguf_get_n_tensors(g);
    for (int64_t i = 0; i < n; ++i) {
        struct ggml_tensor * t = ggml_get_tensor(ctx, gguf_get_tensor_name(g, i));
        if (!ggml_validate_row_data(t->type, t->data, ggml_nbytes(t))) { printf("invalid rows in %s\n", t->name); return 1; }
    }
    printf("ok: %lld tensors, %lld metadata keys, all rows valid\n", (long long) n, (long long) gguf_get_n_kv(g));
    return 0;
}
