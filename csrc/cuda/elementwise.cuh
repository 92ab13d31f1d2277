// Launch geometry and vector types shared by the elementwise CUDA kernels (int_quant.cu, float_cast.cu).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qkernels {
namespace cuda {

constexpr int kThreads = 256;  // threads per block
constexpr int kVec = 8;        // elements per thread in the vectorized kernels

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// blocks for `work` threads of a grid-stride kernel (at most 2^20 blocks)
inline unsigned grid_for(int64_t work) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 1 << 20));
}

inline bool aligned_to(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

}  // namespace cuda
}  // namespace qkernels
