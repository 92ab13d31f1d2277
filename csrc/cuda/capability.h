// Device queries and the capability switch shared by the CUDA entry points (csrc/cuda/*_ops.cpp).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "arch_list.h"

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

#define QK_CAP_STRINGIFY(...) #__VA_ARGS__
#define QK_CAP_XSTRINGIFY(...) QK_CAP_STRINGIFY(__VA_ARGS__)

// Capability switch for the CUDA entry points: a GPU this build has no code for gets a clear error naming its
// capability instead of the driver's "no kernel image is available" (the dispatch table already routes such GPUs
// to Triton; this guards direct torch.ops calls).
inline void check_capability(const char* op) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
#if defined(QK_CUDA_ARCHS)
  const char* archs = QK_CAP_XSTRINGIFY(QK_CUDA_ARCHS);
#else
  const char* archs = "";
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(arch_list_runs(archs, major, minor), op, " CUDA kernel not implemented for capability ",
                              major, ".", minor, " (this build's TORCH_CUDA_ARCH_LIST: ", archs, ")");
}

}  // namespace cuda
}  // namespace qkernels
