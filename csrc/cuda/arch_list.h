// Which CUDA archs a build can run on (used by capability.h). No torch or CUDA headers: tests compile it alone.
#pragma once

namespace qkernels {
namespace cuda {

// Whether a build for the TORCH_CUDA_ARCH_LIST entries in `archs` ("8.0,9.0a,10.0a+PTX": setup.py's QK_CUDA_ARCHS)
// has code that runs on capability major.minor: SASS runs on the same major with an equal or higher minor, "a"/"f"
// archs only on exactly their own capability (their instructions are not forward compatible), PTX on anything
// newer: the rules of qkernels.dispatch.arch_runs. Free of torch and CUDA headers, so that a test can compile it on
// any machine and compare it with arch_runs (tests/test_dispatch.py).
inline bool arch_list_runs(const char* archs, int major, int minor) {
  const char* p = archs;
  while (*p) {
    while (*p == ',' || *p == ';' || *p == ' ') ++p;
    if (!*p) break;
    int ma = 0, mi = 0, digits = 0;
    while (*p >= '0' && *p <= '9') ma = ma * 10 + (*p++ - '0'), ++digits;
    if (*p == '.') {
      ++p;
      while (*p >= '0' && *p <= '9') mi = mi * 10 + (*p++ - '0');
    }
    const bool specific = *p == 'a' || *p == 'f';
    if (specific) ++p;
    bool ptx = false;
    if (p[0] == '+' && p[1] == 'P' && p[2] == 'T' && p[3] == 'X') ptx = true, p += 4;
    while (*p && *p != ',' && *p != ';' && *p != ' ') ++p;  // skip anything unparsed in this entry
    if (digits == 0) continue;
    const bool newer_or_same = major > ma || (major == ma && minor >= mi);
    if (ptx && newer_or_same) return true;
    if (specific && major == ma && minor == mi) return true;
    if (!specific && major == ma && minor >= mi) return true;
  }
  return false;
}

}  // namespace cuda
}  // namespace qkernels
