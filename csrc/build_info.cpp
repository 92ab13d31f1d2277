// cuda_build_archs(): which CUDA archs this build of qkernels._C contains (qkernels._ext.compiled_cuda_archs and
// the dispatch table read it, so a GPU whose arch was left out falls back to Triton instead of failing to launch).
#include <torch/library.h>

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

}  // namespace

// No tensor arguments, so no backend key would select a per-device kernel: register for every backend at once.
TORCH_LIBRARY_IMPL(qkernels, CompositeExplicitAutograd, m) { m.impl("cuda_build_archs", &cuda_build_archs); }

}  // namespace qkernels
