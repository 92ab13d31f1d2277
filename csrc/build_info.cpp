// cuda_build_archs(): which CUDA archs this build of qkernels._C contains (qkernels._ext.compiled_cuda_archs and
// the dispatch table read it, so a GPU whose arch was left out falls back to Triton instead of failing to launch);
// cpu_isa(): which CPU kernels the next call will run ("avx2" or "scalar", after QKERNELS_CPU_ISA), so tests that
// compare the two can assert that both really ran.
#include <torch/library.h>

#include "cpu/cpu_dispatch.h"

#include <string>

namespace qkernels {
namespace {

#define QK_STRINGIFY(...) #__VA_ARGS__
#define QK_XSTRINGIFY(...) QK_STRINGIFY(__VA_ARGS__)

std::string cuda_build_archs() {
#if defined(QK_WITH_CUDA) && defined(QK_CUDA_ARCHS)
  // setup.py passes the list with commas (a ';' cannot survive the compiler command line); report it with ';'
  std::string s = QK_XSTRINGIFY(QK_CUDA_ARCHS);
  std::string out;
  for (char c : s) {
    if (c == ',') out += ';';
    else if (c != ' ') out += c;
  }
  return out;
#else
  return "";
#endif
}

std::string cpu_isa() { return cpu::use_avx2() ? "avx2" : "scalar"; }

}  // namespace

// No tensor arguments, so no backend key would select a per-device kernel: register for every backend at once.
TORCH_LIBRARY_IMPL(qkernels, CompositeExplicitAutograd, m) {
  m.impl("cuda_build_archs", &cuda_build_archs);
  m.impl("cpu_isa", &cpu_isa);
}

}  // namespace qkernels
