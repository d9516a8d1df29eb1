// One include for every .cu: the real CUDA runtime under nvcc, the CPU emulation under a host compiler.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

// AK_LAUNCH(kernel, grid, block, dynamic smem bytes, stream, args...); AK_DYNAMIC_SMEM(name) declares the block's
// dynamic shared memory as `unsigned char name[]` (16-byte aligned).
#ifdef AK_EMULATION
#include "emulation.h"
#define AK_LAUNCH(kernel, grid, block, smem, stream, ...) ak_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define AK_FLAVOUR "cpu-emulation"
#else
#include <cuda_runtime.h>
#define AK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define AK_LAUNCH(kernel, grid, block, smem, stream, ...)   \
  do {                                                      \
    ak::allow_dynamic_smem(kernel, smem);                   \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);     \
  } while (0)
#define AK_FLAVOUR "cuda"
#endif

namespace ak {
#ifndef AK_EMULATION
// Above 48 KiB a kernel must opt in to its dynamic shared memory before it is launched.
template <class Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > (48u << 10)) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess)
      throw std::runtime_error("cannot give a kernel " + std::to_string(bytes) +
                               " bytes of dynamic shared memory: " + cudaGetErrorString(err));
  }
}
#endif

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
