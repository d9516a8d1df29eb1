// Shared tiling of the fp32 SIMT kernels: BM rows x BN keys per tile, D streamed through shared memory in BK
// chunks, 128 threads; thread (r, g) with r = tid / LANES owns tile row r and keys g*KPT .. g*KPT + KPT - 1.
#pragma once

#include "cuda_compat.h"
#include "launchers.h"

namespace ak {
namespace {

constexpr int BM = 32;
constexpr int BN = 32;
constexpr int BK = 32;
constexpr int THREADS = 128;
constexpr int LANES = THREADS / BM;  // threads per tile row
constexpr int KPT = BN / LANES;      // keys per thread
static_assert(BM == BN, "tile_dots stages row and key tiles with the same loop");

struct Keys {
  const float* ptr;
  int64_t sk, sd;
  __device__ __forceinline__ float at(int64_t j, int64_t d) const { return ptr[j * sk + d * sd]; }
};

struct Scales {
  const float* rs;  // (N,) student row inverse norms
  const float* rt;  // (N,) teacher row inverse norms
  const float* rk;  // (K,) key inverse norms
};

struct Tiles {
  float s[BM][BK + 1];
  float t[BM][BK + 1];
  float k[BN][BK + 1];
};

// as[c] = s_row · k_(key0 + g*KPT + c), at[c] likewise for t (when TWO), for this thread's row r = tid / LANES.
template <bool TWO = true>
__device__ void tile_dots(const Rows& S, const Rows& T, const Keys& Kb, int64_t row0, int64_t N, int64_t key0,
                          int64_t K, int64_t D, Tiles& sh, float* as, float* at) {
  const int tid = threadIdx.x, r = tid / LANES, g = tid % LANES;
  for (int c = 0; c < KPT; ++c) as[c] = at[c] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += BK) {
    for (int i = tid; i < BM * BK; i += THREADS) {
      const int rr = i / BK, dd = i % BK;
      const int64_t n = row0 + rr, j = key0 + rr, d = d0 + dd;
      const bool row_ok = n < N && d < D, key_ok = j < K && d < D;
      sh.s[rr][dd] = row_ok ? S.at(n, d) : 0.f;
      if (TWO) sh.t[rr][dd] = row_ok ? T.at(n, d) : 0.f;
      sh.k[rr][dd] = key_ok ? Kb.at(j, d) : 0.f;
    }
    __syncthreads();
    for (int dd = 0; dd < BK; ++dd) {
      const float sv = sh.s[r][dd], tv = TWO ? sh.t[r][dd] : 0.f;
      for (int c = 0; c < KPT; ++c) {
        const float kv = sh.k[g * KPT + c][dd];
        as[c] += sv * kv;
        if (TWO) at[c] += tv * kv;
      }
    }
    __syncthreads();
  }
}

inline Rows rows_of(const RowsArg& a) { return Rows{reinterpret_cast<const float*>(a.ptr), a.P, a.sb, a.sp, a.sd}; }
inline Keys keys_of(uintptr_t k, int64_t sk, int64_t sd) { return Keys{reinterpret_cast<const float*>(k), sk, sd}; }
template <class T>
T* out(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline unsigned blocks(int64_t n, int64_t per) { return unsigned((n + per - 1) / per); }

}  // namespace
}  // namespace ak
