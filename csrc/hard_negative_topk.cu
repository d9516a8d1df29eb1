// Hard-negative top-k: fused similarity and selection, fp32 SIMT, no N x K matrix.
//
//   sim_ij = (a_i·k_j) ra_i rk_j; candidates: key_label_j != anchor_label_i and key_label_j != ignore;
//   out: the k best per row as packed (value, index) keys (csrc/topk_pack.h: ties to the lower index).
//
// Block = BM anchors; key tiles of BN through the shared tiling (tiles.cuh). Each tile's packed candidates go to
// shared memory; then one thread per row merges them into that row's list, kept sorted descending in a workspace
// (N x k int64, owned by the block: no atomics, deterministic). After the first k candidates, a tile entry only
// costs a compare against the row's k-th key; an insertion shifts the list (rare once it has filled).
#include <cmath>

#include "cuda_compat.h"
#include "launch_plans.h"
#include "launchers.h"
#include "tiles.cuh"
#include "topk_pack.h"

namespace ak {
namespace {

__global__ void topk_kernel(Rows A, Keys Kb, const float* ra, const float* rk, const int64_t* ya, const int64_t* yk,
                            int64_t ignore, int64_t N, int64_t K, int64_t D, int64_t k, int64_t* work,
                            float* values, int64_t* indices) {
  __shared__ Tiles sh;
  __shared__ int64_t cand[BM][BN];
  const int tid = threadIdx.x, r = tid / LANES, g = tid % LANES;
  const int64_t row0 = int64_t(blockIdx.x) * BM, n = row0 + r;
  const bool row_ok = n < N;
  const float scale = row_ok ? ra[n] : 0.f;
  const int64_t label = row_ok ? ya[n] : 0;
  int64_t* list = work + (row_ok ? n : 0) * k;
  int64_t count = 0;
  float as[KPT], unused[KPT];
  for (int64_t key0 = 0; key0 < K; key0 += BN) {
    tile_dots<false>(A, A, Kb, row0, N, key0, K, D, sh, as, unused);
    for (int c = 0; c < KPT; ++c) {
      const int64_t j = key0 + g * KPT + c;
      const bool ok = row_ok && j < K && yk[j] != label && yk[j] != ignore;
      cand[r][g * KPT + c] = ok ? pack_candidate(as[c] * scale * rk[j], j) : kPackedNone;
    }
    __syncthreads();
    if (g == 0 && row_ok) {
      for (int c = 0; c < BN; ++c) {
        const int64_t key = cand[r][c];
        if (key == kPackedNone || (count == k && key <= list[k - 1])) continue;
        int64_t pos = count < k ? count++ : k - 1;
        while (pos > 0 && list[pos - 1] < key) {
          list[pos] = list[pos - 1];
          --pos;
        }
        list[pos] = key;
      }
    }
    __syncthreads();
  }
  if (g == 0 && row_ok) {
    for (int64_t i = 0; i < k; ++i) {
      values[n * k + i] = i < count ? packed_value(list[i]) : -INFINITY;
      indices[n * k + i] = i < count ? packed_index(list[i]) : -1;
    }
  }
}

// One CTA per BM rows; loops per CTA: the key tiles, then the BK-wide feature chunks of tile_dots inside each.
// The demangled name is checked against the nvcc cubin's symbols in tests/test_cuda_kernels.py.
LaunchPlan topk_plan(int64_t N, int64_t K, int64_t D) {
  return LaunchPlan{"ak::(anonymous namespace)::topk_kernel(ak::Rows, ak::(anonymous namespace)::Keys, float const*, "
                    "float const*, long const*, long const*, long, long, long, long, long, long*, float*, long*)",
                    blocks(N, BM), 1, THREADS, 0, {(K + BN - 1) / BN, (D + BK - 1) / BK}};
}

}  // namespace

std::vector<LaunchPlan> hard_negative_topk_plans(const std::string&, int64_t N, int64_t K, int64_t D, int64_t) {
  if (N == 0) return {};
  return {topk_plan(N, K, D)};
}

void hard_negative_topk(RowsArg a, uintptr_t k_ptr, int64_t k_sk, int64_t k_sd, uintptr_t ra, uintptr_t rk,
                        uintptr_t ya, uintptr_t yk, int64_t ignore_label, int64_t N, int64_t K, int64_t D, int64_t k,
                        uintptr_t work, uintptr_t values, uintptr_t indices, uintptr_t stream) {
  if (N == 0 || k <= 0) return;
  const LaunchPlan p = topk_plan(N, K, D);
  AK_LAUNCH(topk_kernel, dim3(p.grid_x, p.grid_y), dim3(p.block), size_t(p.dynamic_smem), reinterpret_cast<cudaStream_t>(stream), rows_of(a),
            keys_of(k_ptr, k_sk, k_sd), out<const float>(ra), out<const float>(rk), out<const int64_t>(ya),
            out<const int64_t>(yk), ignore_label, N, K, D, k, out<int64_t>(work), out<float>(values),
            out<int64_t>(indices));
  check_launch("hard_negative_topk topk_kernel");
}

}  // namespace ak
