// Single-warp kernels that run one primitive of csrc/warp_matrix.cuh (or a warp intrinsic) on data given by the
// test: tests/test_cuda_primitives.py builds every lane's registers from the PTX ISA's tables itself and checks the
// results against plain matrix products and the CUDA definitions. They are built into the emulation/test module
// _C_cpu only (setup.py, CMakeLists.txt), never into the CUDA module _C that users load; the kernel report compiles
// them with nvcc for sm_80 and sm_90 (tests/kernel_known_limits.json).
#include <cstdint>

#include "cuda_compat.h"
#include "launchers.h"
#include "warp_matrix.cuh"

namespace ak {
namespace {

// a (32, 4), b (32, 2) registers per lane, c, d (32, 4) floats per lane; type: 1 bf16, 2 fp16, 3 tf32.
__global__ void selftest_mma_kernel(int type, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[lane * 4 + i], acc[i] = c[lane * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[lane * 2 + i];
  if (type == 1) mma_bf16_16816(acc, ra, rb);
  else if (type == 2) mma_f16_16816(acc, ra, rb);
  else mma_tf32_1688(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

// image: `elems` 16-bit values copied to shared memory; lane l passes row address image + offsets[l] (elements).
__global__ void selftest_ldmatrix_kernel(const uint16_t* image, int elems, const int* offsets, int num, int trans,
                                         uint32_t* out) {
  AK_DYNAMIC_SMEM(smem);
  uint16_t* sh = reinterpret_cast<uint16_t*>(smem);
  const int lane = threadIdx.x;
  for (int i = lane; i < elems; i += 32) sh[i] = image[i];
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  const void* row = sh + offsets[lane];
  if (num == 4) {
    if (trans) ldmatrix_x4_trans(r, row);
    else ldmatrix_x4(r, row);
  } else {
    uint32_t r2[2];
    if (trans) ldmatrix_x2_trans(r2, row);
    else ldmatrix_x2(r2, row);
    r[0] = r2[0], r[1] = r2[1];
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// mode 0 idx, 1 up, 2 down, 3 xor; 32-bit shuffle of the low words and 64-bit shuffle of the whole values.
__global__ void selftest_shfl_kernel(int mode, int width, const uint64_t* values, const int* args, uint32_t* out32,
                                     uint64_t* out64) {
  const int lane = threadIdx.x;
  const uint64_t v = values[lane];
  const uint32_t v32 = uint32_t(v);
  const int arg = args[lane];
  const unsigned full = 0xffffffffu;
  uint32_t r32;
  unsigned long long r64;
  const unsigned long long v64 = v;
  if (mode == 0) r32 = __shfl_sync(full, v32, arg, width), r64 = __shfl_sync(full, v64, arg, width);
  else if (mode == 1) r32 = __shfl_up_sync(full, v32, unsigned(arg), width), r64 = __shfl_up_sync(full, v64, unsigned(arg), width);
  else if (mode == 2) r32 = __shfl_down_sync(full, v32, unsigned(arg), width), r64 = __shfl_down_sync(full, v64, unsigned(arg), width);
  else r32 = __shfl_xor_sync(full, v32, arg, width), r64 = __shfl_xor_sync(full, v64, arg, width);
  out32[lane] = r32;
  out64[lane] = r64;
}

__global__ void selftest_vote_kernel(const int* pred, uint32_t* ballot, int* any, int* all) {
  const int lane = threadIdx.x;
  ballot[lane] = __ballot_sync(0xffffffffu, pred[lane]);
  any[lane] = __any_sync(0xffffffffu, pred[lane]);
  all[lane] = __all_sync(0xffffffffu, pred[lane]);
}

// Lane l copies 16 bytes from src + 16 l with src_bytes[l] valid bytes into shared memory; `early` is what the
// destination held right after the copy was issued, `landed` what it holds after cp.async.wait_group 0.
__global__ void selftest_cp_async_kernel(const uint8_t* src, const int* src_bytes, uint8_t* early, uint8_t* landed) {
  AK_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x;
  for (int i = 0; i < 16; ++i) smem[lane * 16 + i] = 0xEE;
  cp_async_16(smem + lane * 16, src + lane * 16, src_bytes[lane]);
  cp_async_commit();
  for (int i = 0; i < 16; ++i) early[lane * 16 + i] = smem[lane * 16 + i];
  cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) landed[lane * 16 + i] = smem[lane * 16 + i];
}

// n pairs (x[2i], x[2i+1]) -> packed bf16x2, f16x2; n * 2 values -> tf32 bits; 2^x of every value.
__global__ void selftest_convert_kernel(const float* x, int n, uint32_t* bf16, uint32_t* f16, uint32_t* tf32,
                                        float* exp2) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    bf16[i] = pack_bf16x2(x[2 * i], x[2 * i + 1]);
    f16[i] = pack_f16x2(x[2 * i], x[2 * i + 1]);
  }
  for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
    tf32[i] = to_tf32(x[i]);
    exp2[i] = fast_exp2(x[i]);
  }
}

// Broken on purpose, for the emulation's error tests: lanes meeting at different collectives; a lane that exits
// while its warp waits for it.
__global__ void selftest_divergent_kernel(int* out) {
  const int lane = threadIdx.x;
  if (lane < 16) out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
  else out[lane] = int(__ballot_sync(0xffffffffu, 1));
}

__global__ void selftest_exit_kernel(int* out) {
  const int lane = threadIdx.x;
  if (lane == 0) return;
  out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void selftest_mma(int type, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t stream) {
  AK_LAUNCH(selftest_mma_kernel, dim3(1), dim3(32), 0, as_stream(stream), type, ptr<const uint32_t>(a),
            ptr<const uint32_t>(b), ptr<const float>(c), ptr<float>(d));
  check_launch("selftest_mma_kernel");
}

void selftest_ldmatrix(uintptr_t image, int elems, uintptr_t offsets, int num, bool trans, uintptr_t out,
                       uintptr_t stream) {
  AK_LAUNCH(selftest_ldmatrix_kernel, dim3(1), dim3(32), size_t(elems) * 2, as_stream(stream),
            ptr<const uint16_t>(image), elems, ptr<const int>(offsets), num, int(trans), ptr<uint32_t>(out));
  check_launch("selftest_ldmatrix_kernel");
}

void selftest_shfl(int mode, int width, uintptr_t values, uintptr_t args, uintptr_t out32, uintptr_t out64,
                   uintptr_t stream) {
  AK_LAUNCH(selftest_shfl_kernel, dim3(1), dim3(32), 0, as_stream(stream), mode, width, ptr<const uint64_t>(values),
            ptr<const int>(args), ptr<uint32_t>(out32), ptr<uint64_t>(out64));
  check_launch("selftest_shfl_kernel");
}

void selftest_vote(uintptr_t pred, uintptr_t ballot, uintptr_t any, uintptr_t all, uintptr_t stream) {
  AK_LAUNCH(selftest_vote_kernel, dim3(1), dim3(32), 0, as_stream(stream), ptr<const int>(pred),
            ptr<uint32_t>(ballot), ptr<int>(any), ptr<int>(all));
  check_launch("selftest_vote_kernel");
}

void selftest_cp_async(uintptr_t src, uintptr_t src_bytes, uintptr_t early, uintptr_t landed, uintptr_t stream) {
  AK_LAUNCH(selftest_cp_async_kernel, dim3(1), dim3(32), 32 * 16, as_stream(stream), ptr<const uint8_t>(src),
            ptr<const int>(src_bytes), ptr<uint8_t>(early), ptr<uint8_t>(landed));
  check_launch("selftest_cp_async_kernel");
}

void selftest_convert(uintptr_t x, int n, uintptr_t bf16, uintptr_t f16, uintptr_t tf32, uintptr_t exp2,
                      uintptr_t stream) {
  AK_LAUNCH(selftest_convert_kernel, dim3(1), dim3(128), 0, as_stream(stream), ptr<const float>(x), n,
            ptr<uint32_t>(bf16), ptr<uint32_t>(f16), ptr<uint32_t>(tf32), ptr<float>(exp2));
  check_launch("selftest_convert_kernel");
}

void selftest_broken(int which, uintptr_t out, uintptr_t stream) {
#ifndef AK_EMULATION
  // undefined behaviour on a GPU (it may hang the warp): these exist to test the emulation's error reports
  (void)which, (void)out, (void)stream;
  throw std::runtime_error("selftest_broken runs in the CPU emulation only");
#endif
  if (which == 0)
    AK_LAUNCH(selftest_divergent_kernel, dim3(1), dim3(32), 0, as_stream(stream), ptr<int>(out));
  else
    AK_LAUNCH(selftest_exit_kernel, dim3(1), dim3(32), 0, as_stream(stream), ptr<int>(out));
  check_launch("selftest_broken");
}

}  // namespace ak
