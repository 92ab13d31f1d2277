// Device queries and the capability switch shared by the CUDA entry points (csrc/cuda/*_ops.cpp).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace qkernels {
namespace cuda {

// Device attributes through the runtime API: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers that a
// bare CUDA toolkit (as on the CI and build machines) may not ship.
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}

// Capability switch over the archs this build targets (setup.py passes -DQK_ENABLE_SMxx per TORCH_CUDA_ARCH_LIST
// entry). Kernels whose source is the same for every arch (arch-specific instructions are selected inside them with
// __CUDA_ARCH__) only need some build of them to exist. Which binary actually loads on a given minor is the
// driver's business; qkernels.dispatch.arch_runs mirrors it.
inline void check_capability(const char* op) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
  switch (major) {
#if defined(QK_ENABLE_SM80) || defined(QK_ENABLE_SM86) || defined(QK_ENABLE_SM87) || defined(QK_ENABLE_SM89)
    case 8: return;
#endif
#if defined(QK_ENABLE_SM90)
    case 9: return;
#endif
#if defined(QK_ENABLE_SM100) || defined(QK_ENABLE_SM103)
    case 10: return;
#endif
#if defined(QK_ENABLE_SM120) || defined(QK_ENABLE_SM121)
    case 12: return;
#endif
    default: break;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, " CUDA kernel not implemented for capability ", major, ".", minor,
                              " (not in this build's TORCH_CUDA_ARCH_LIST)");
}

}  // namespace cuda
}  // namespace qkernels
