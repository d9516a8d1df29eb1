// One include for every .cu: the real CUDA runtime under nvcc, the CPU emulation under a host compiler.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef AK_EMULATION
#include "emulation.h"
#define AK_LAUNCH(kernel, grid, block, stream, ...) ak_emu::launch(kernel, grid, block, __VA_ARGS__)
#define AK_FLAVOUR "cpu-emulation"
#else
#include <cuda_runtime.h>
#define AK_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define AK_FLAVOUR "cuda"
#endif

namespace ak {
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " failed to launch: " + cudaGetErrorString(err));
}

// A row matrix read in place from a (B, P, D) strided view: row n is (n / P, n % P).
struct Rows {
  const float* ptr;
  int64_t P, sb, sp, sd;
  __device__ __forceinline__ float at(int64_t n, int64_t d) const { return ptr[(n / P) * sb + (n % P) * sp + d * sd]; }
};
}  // namespace ak
