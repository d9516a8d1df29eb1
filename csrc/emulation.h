// CPU emulation of the small CUDA subset used by csrc/*.cu, so the same kernel source runs on CPU threads in tests.
//
// Model: the blocks of a grid run one after another; the threads of a block run concurrently as std::threads,
// with __syncthreads as a std::barrier. Because blocks never overlap, `__shared__` can be a function-local static:
// one copy per kernel, owned by whichever block is running. Consequences: kernels must call __syncthreads from
// every thread of the block (as CUDA requires anyway), and two emulated launches must not run at once
// (launch() holds a global mutex). Warp intrinsics are not provided: the kernels exchange data through shared
// memory only.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace ak_emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::mutex launch_mutex;

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned threads = block.x * block.y * block.z;
  block_dim = block;
  grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(threads);
        block_barrier = &bar;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([=] {
            thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            block_idx = dim3(bx, by, bz);
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
        block_barrier = nullptr;
      }
}
}  // namespace ak_emu

#define threadIdx (ak_emu::thread_idx)
#define blockIdx (ak_emu::block_idx)
#define blockDim (ak_emu::block_dim)
#define gridDim (ak_emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static

inline void __syncthreads() { ak_emu::block_barrier->arrive_and_wait(); }

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
