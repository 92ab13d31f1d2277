// Shared by the CPU (.cpp) and CUDA (.cu) builds: per-element math lives in QK_HD functions so that the CPU tests
// exercise exactly the code the GPU kernels run.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline
#endif
