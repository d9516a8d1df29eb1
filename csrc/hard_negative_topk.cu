// Hard-negative top-k on tensor cores: similarities by mma, selection by a per-row threshold and a per-warp
// candidate queue, no N x K matrix, deterministic.
//
//   sim_ij = (a_i·k_j) ra_i rk_j; candidates: key_label_j != anchor_label_i and key_label_j != ignore;
//   out: the k best per row in the packed (value, index) order of csrc/topk_pack.h (higher value first, ties to the
//   lower index), padded with (-inf, -1).
//
// A warp owns 16 rows; key tiles stream through double-buffered shared memory with their labels. Each row keeps
// its sorted list of at most k packed keys in global memory (the `indices` output, converted in place at the end)
// and a threshold: the list's k-th key once it holds k, else nothing. Per tile a candidate is kept only if its
// packed key beats the row's threshold; the warp first asks (one vote) whether any lane has one, and if so compacts
// them into the row's queue in shared memory (a quad-wide prefix of per-lane counts gives each lane its slots).
// When a row's queue could overflow, the warp merges every row's queue into its list: each queued key's final
// position is its rank among the queued keys plus its rank in the list (a binary search), list entries below the
// new keys shift down by the number of queued keys above them, in chunks of 32 from the bottom (reads before
// writes, so the merge is in place), and the threshold is refreshed. Packed keys are unique, so the result is the
// exact top-k whatever the order in which candidates arrive: deterministic, no atomics.
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda_compat.h"
#include "launch_plans.h"
#include "launchers.h"
#include "tc_tiles.cuh"
#include "topk_pack.h"

namespace ak {

struct TopkParams {
  Src a, k;
  const float *ra, *rk;
  const int64_t *ya, *yk;
  int64_t ignore, N, K, topk;
  int D;
  float* values;     // (N, topk)
  int64_t* indices;  // (N, topk): each row's sorted packed keys while running, then the key indices
};

// BM rows resident, BN keys per streamed tile (two stages), a queue of `queue` packed keys per row (>= BN: one
// tile's candidates of a row always fit an empty queue; 64 where shared memory allows, fewer merges).
struct TopkCfg {
  int bm, bn, queue;
};
template <class T, int D>
AK_HD_CONSTEXPR TopkCfg topk_cfg() {
  if constexpr (!is_f32<T>)
    return D <= 128 ? TopkCfg{64, 64, 64} : D == 256 ? TopkCfg{64, 32, 32} : TopkCfg{32, 16, 64};
  else
    return D == 64 ? TopkCfg{64, 64, 64} : D == 128 ? TopkCfg{64, 32, 32} : D == 256 ? TopkCfg{32, 16, 64}
                                                                                  : TopkCfg{16, 8, 64};
}

struct RowState {
  int64_t thr;  // the row's k-th packed key, or kPackedNone while it holds fewer than k
  int32_t count, pending;
};

template <class T, int D>
AK_HD_CONSTEXPR int64_t topk_smem() {
  constexpr TopkCfg c = topk_cfg<T, D>();
  return tile_bytes<T, D>(c.bm) + 2 * tile_bytes<T, D>(c.bn) + 2 * 12 * c.bn +
         int64_t(c.bm) * (c.queue * 8 + int64_t(sizeof(RowState))) + (c.bm / 16) * c.queue * 4 + kMaxTileRows * 8;
}
static_assert(topk_smem<Bf16, 128>() <= kSmemLimit && topk_smem<Bf16, 256>() <= kSmemLimit &&
                  topk_smem<Bf16, 512>() <= kSmemLimit && topk_smem<F32, 64>() <= kSmemLimit &&
                  topk_smem<F32, 128>() <= kSmemLimit && topk_smem<F32, 256>() <= kSmemLimit &&
                  topk_smem<F32, 512>() <= kSmemLimit,
              "top-k tiles exceed the shared-memory budget");

// Number of entries of a descending array greater than `key` (keys are unique).
template <class P>
AK_DEV int count_greater(P arr, int n, int64_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (arr[mid] > key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Merges the queue of every row of this warp into the row's list (all 32 lanes).
template <int Q>
AK_DEV void flush_queues(const TopkParams& p, int64_t warp_row0, int64_t* queue, int* dest, RowState* state) {
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < 16; ++r) {
    const int q = state[r].pending;
    if (q == 0) continue;  // uniform: every lane reads the same state
    const int c = state[r].count;
    int64_t* list = p.indices + (warp_row0 + r) * p.topk;
    int64_t* qr = queue + r * Q;
    int64_t key[2];
    int rank_q[2], dst[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int e = lane + 32 * u;
      key[u] = e < q ? qr[e] : kPackedNone;  // Q <= 64: two entries per lane
      rank_q[u] = 0;
      for (int i = 0; i < q; ++i) rank_q[u] += qr[i] > key[u];
      dst[u] = e < q ? rank_q[u] + count_greater(list, c, key[u]) : 0;
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < 2; ++u)
      if (lane + 32 * u < q) {
        qr[rank_q[u]] = key[u];  // the queue, sorted descending, and where each entry goes
        dest[rank_q[u]] = dst[u];
      }
    __syncwarp();
    // list entries at or below the first new key's position shift down; bottom chunk first
    const int lo = dest[0];
    for (int top = c - 1; top >= lo; top -= 32) {
      const int i = top - lane;
      const bool has = i >= lo;
      const int64_t v = has ? list[i] : 0;
      const int shift = has ? count_greater(qr, q, v) : 0;
      __syncwarp();
      if (has && i + shift < p.topk) list[i + shift] = v;
      __syncwarp();
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int e = lane + 32 * u;
      if (e < q && dest[e] < p.topk) list[dest[e]] = qr[e];
    }
    __syncwarp();
    const int filled = c + q < p.topk ? c + q : int(p.topk);
    const int64_t thr = filled == p.topk ? list[p.topk - 1] : kPackedNone;
    __syncwarp();
    if (lane == 0) state[r] = RowState{thr, filled, 0};
    __syncwarp();
  }
}

template <class T, int D>
__global__ void __launch_bounds__(topk_cfg<T, D>().bm * 2, 1) topk_kernel(TopkParams p) {
  constexpr TopkCfg C = topk_cfg<T, D>();
  constexpr int BM = C.bm, BN = C.bn, Q = C.queue, THREADS = BM * 2, NB = BN / 8, LD = D + T::kPad;
  static_assert(Q >= BN && Q <= 64, "queue: at least one tile of candidates, at most two per lane");
  using E = typename T::Elem;
  AK_DYNAMIC_SMEM(smem);
  E* sA = reinterpret_cast<E*>(smem);
  E* sK = sA + BM * LD;                                               // 2 stages
  int64_t* sY = reinterpret_cast<int64_t*>(sK + 2 * BN * LD);         // 2 stages of BN labels
  float* sRk = reinterpret_cast<float*>(sY + 2 * BN);                 // 2 stages of BN inverse norms
  int64_t* sQ = reinterpret_cast<int64_t*>(sRk + 2 * BN);             // BM rows x Q (BN even: 8-aligned)
  RowState* sR = reinterpret_cast<RowState*>(sQ + BM * Q);            // BM
  int* sDest = reinterpret_cast<int*>(sR + BM);                       // BM / 16 warps x Q
  int64_t* bases = reinterpret_cast<int64_t*>(sDest + (BM / 16) * Q);   // load_tile scratch (8-aligned: Q even)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * BM, warp_row0 = row0 + 16 * warp;
  const int tiles = int(ceil_div(p.K, BN));
  int64_t* queue = sQ + 16 * warp * Q;
  RowState* state = sR + 16 * warp;
  int* dest = sDest + warp * Q;

  // Stage s <- key tile j: keys by cp.async, and per key its inverse norm and label (past K: rk 0 and the ignore
  // label, never a candidate).
  auto stage_keys = [&](int s, int j) {
    stream_tile<T, BN, D, THREADS>(sK + s * BN * LD, p.k, int64_t(j) * BN, p.K, p.D);
    static_assert(BN <= THREADS, "one thread per key");
    if (const int c = threadIdx.x; c < BN) {
      const int64_t col = int64_t(j) * BN + c;
      sY[s * BN + c] = col < p.K ? p.yk[col] : p.ignore;
      sRk[s * BN + c] = col < p.K ? p.rk[col] : 0.f;
    }
  };
  load_tile<T, BM, D, THREADS>(sA, p.a, row0, p.N, p.D, bases);
  // a row's state is initialised by another warp than the one owning it: the loop's first barrier publishes it
  for (int r = threadIdx.x; r < BM; r += THREADS) sR[r] = RowState{kPackedNone, 0, 0};

  float ra[2];
  int64_t ya[2];
  bool row_ok[2];  // rows past N have no candidates
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = warp_row0 + g + 8 * h;
    row_ok[h] = n < p.N;
    ra[h] = row_ok[h] ? p.ra[n] : 0.f;
    ya[h] = row_ok[h] ? p.ya[n] : 0;
  }
  const E* const a[1] = {sA + 16 * warp * LD};

  // Per tile: similarities, then every key whose value reaches its row's threshold value is a candidate (a superset
  // of those beating the packed threshold: the merge places keys exactly and drops those past k). One vote skips
  // the rest of the tile when no lane has one; otherwise each lane's slots in its rows' queues come from a
  // quad-wide exclusive prefix of the lane counts (both rows at once, 16 bits each), and only the keys written are
  // packed into 64 bits.
  for (int j = -1; j < tiles; ++j) {  // j = -1 only stages key tile 0: one load site per tile shape
    if (j >= 0) cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < tiles) stage_keys((j + 1) % 2, j + 1);
    cp_async_commit();
    if (j < 0) continue;
    const int s = j % 2;
    float f[1][NB][4] = {};
    warp_logits<T, D, NB, 1>(a, sK + s * BN * LD, f);
    const int64_t key0 = int64_t(j) * BN;
    // rows past N have ra = 0, so v = 0, never >= +inf: no candidates
    float floor_v[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t thr = state[g + 8 * h].thr;
      floor_v[h] = !row_ok[h] ? INFINITY : thr == kPackedNone ? -INFINITY : packed_value(thr);
    }
    float v[NB][4];  // rows g (i < 2) and g + 8, columns 2t + (i & 1) of each 8-key block
    uint32_t bits[2] = {0u, 0u};
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const float2 rk = *reinterpret_cast<const float2*>(sRk + s * BN + 8 * nb + 2 * t);  // one vector load
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          v[nb][2 * h + e] = f[0][nb][2 * h + e] * (ra[h] * (e ? rk.y : rk.x));
          bits[h] |= uint32_t(v[nb][2 * h + e] >= floor_v[h]) << (2 * nb + e);
        }
    }
    // The label test only for the keys that reach the threshold value (a row sees about k ln(K / k) of them over
    // the whole stream, after its list first fills): 64-bit label compares per logit were a third of the loop.
    int cnt[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll 1
      for (uint32_t m = bits[h]; m != 0u; m &= m - 1u) {
        const int b = __ffs(int(m)) - 1;  // bit 2 nb + e
        const int64_t l = sY[s * BN + 8 * (b >> 1) + 2 * t + (b & 1)];
        if (l == p.ignore || l == ya[h]) bits[h] &= ~(1u << b);
      }
      cnt[h] = __popc(bits[h]);
    }
    if (!__any_sync(0xffffffffu, cnt[0] + cnt[1] > 0)) continue;
    const int mine = cnt[0] | (cnt[1] << 16);
    int incl = mine;
    int up = __shfl_up_sync(0xffffffffu, incl, 1, 4);
    if (t >= 1) incl += up;
    up = __shfl_up_sync(0xffffffffu, incl, 2, 4);
    if (t >= 2) incl += up;
    const int total = __shfl_sync(0xffffffffu, incl, 3, 4), excl = incl - mine;
    bool overflow = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) overflow |= state[g + 8 * h].pending + ((total >> (16 * h)) & 0xffff) > Q;
    if (__any_sync(0xffffffffu, overflow)) {
      __syncwarp();
      flush_queues<Q>(p, warp_row0, queue, dest, state);
    }
    // Only the set bits: a lane loops as many times as it has candidates (late in the stream, 0 or 1), fetching
    // each value from its registers by a compare-select chain (an indexed register array would live in memory).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      int pos = state[r].pending + ((excl >> (16 * h)) & 0xffff);
#pragma unroll 1
      for (uint32_t m = bits[h]; m != 0u; m &= m - 1u) {
        const int b = __ffs(int(m)) - 1;  // bit 2 nb + e
        float val = 0.f;
#pragma unroll
        for (int q = 0; q < 2 * NB; ++q) val = q == b ? v[q >> 1][2 * h + (q & 1)] : val;
        queue[r * Q + pos++] = pack_candidate(val, key0 + 8 * (b >> 1) + 2 * t + (b & 1));
      }
    }
    __syncwarp();
    if (t == 0) {
      state[g].pending += total & 0xffff;
      state[g + 8].pending += total >> 16;
    }
    __syncwarp();
  }
  cp_async_wait<0>();
  __syncwarp();
  flush_queues<Q>(p, warp_row0, queue, dest, state);
  for (int r = 0; r < 16; ++r) {
    const int64_t n = warp_row0 + r;
    if (n >= p.N) break;
    const int c = state[r].count;
    for (int64_t i = lane; i < p.topk; i += 32) {
      const int64_t v = i < c ? p.indices[n * p.topk + i] : kPackedNone;
      p.values[n * p.topk + i] = i < c ? packed_value(v) : -INFINITY;
      p.indices[n * p.topk + i] = i < c ? packed_index(v) : -1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
namespace {

template <class T, int D>
LaunchPlan plan_of(int64_t N, int64_t K) {
  constexpr TopkCfg c = topk_cfg<T, D>();
  return LaunchPlan{std::string("void ak::topk_kernel<") + T::name + ", " + std::to_string(D) + ">(ak::TopkParams)",
                    ceil_div(N, c.bm), 1, unsigned(c.bm * 2), topk_smem<T, D>(),
                    // loops per CTA: the key tiles, then the logits' feature loop where it stays a loop
                    logits_loop_trips<T, D>() > 1
                        ? std::vector<int64_t>{ceil_div(K, c.bn), logits_loop_trips<T, D>()}
                        : std::vector<int64_t>{ceil_div(K, c.bn)}};
}

template <class T>
LaunchPlan plan_for_d(int64_t N, int64_t K, int64_t D) {
  switch (feature_bucket(D)) {
    case 64: return plan_of<T, 64>(N, K);
    case 128: return plan_of<T, 128>(N, K);
    case 256: return plan_of<T, 256>(N, K);
    case 512: return plan_of<T, 512>(N, K);
  }
  throw std::invalid_argument("hard_negative_topk CUDA kernel supports D <= 512 features, got D = " +
                              std::to_string(D) + " (use backend 'triton' or 'chunked')");
}

LaunchPlan plan_for(const std::string& dtype, int64_t N, int64_t K, int64_t D) {
  if (dtype == "bf16") return plan_for_d<Bf16>(N, K, D);
  if (dtype == "fp16") return plan_for_d<F16>(N, K, D);
  if (dtype == "fp32") return plan_for_d<F32>(N, K, D);
  throw std::invalid_argument("dtype must be 'bf16', 'fp16' or 'fp32', got '" + dtype + "'");
}

template <class T, int D>
void launch_one(const TopkParams& p, cudaStream_t stream) {
  const LaunchPlan plan = plan_of<T, D>(p.N, p.K);
  void (*kernel)(TopkParams) = topk_kernel<T, D>;
  AK_LAUNCH(kernel, dim3(plan.grid_x, plan.grid_y), dim3(plan.block), size_t(plan.dynamic_smem), stream, p);
  check_launch(plan.kernel.c_str());
}

template <class T>
void launch_d(const TopkParams& p, cudaStream_t stream) {
  switch (feature_bucket(p.D)) {
    case 64: return launch_one<T, 64>(p, stream);
    case 128: return launch_one<T, 128>(p, stream);
    case 256: return launch_one<T, 256>(p, stream);
    case 512: return launch_one<T, 512>(p, stream);
  }
  throw std::invalid_argument("hard_negative_topk CUDA kernel supports D <= 512 features, got D = " +
                              std::to_string(p.D) + " (use backend 'triton' or 'chunked')");
}

}  // namespace

std::vector<LaunchPlan> hard_negative_topk_plans(const std::string& dtype, int64_t N, int64_t K, int64_t D,
                                                 int64_t) {
  if (N == 0) return {};
  return {plan_for(dtype, N, K, D)};
}

void hard_negative_topk(const std::string& dtype, RowsArg a, RowsArg k, uintptr_t ra, uintptr_t rk, uintptr_t ya,
                        uintptr_t yk, int64_t ignore_label, int64_t N, int64_t K, int64_t D, int64_t topk,
                        uintptr_t values, uintptr_t indices, uintptr_t stream) {
  if (N == 0 || topk <= 0) return;
  if (!src_of(k, K, dtype == "fp32" ? 4 : 2).uniform)
    throw std::invalid_argument("keys k must be uniform rows (feature stride 1, 16-byte aligned rows) for the top-k "
                                "kernel: pass a padded copy (see uniform_rows)");
  const int bytes = dtype == "fp32" ? 4 : 2;
  TopkParams p{};
  p.a = src_of(a, N, bytes);
  p.k = src_of(k, K, bytes);
  p.ra = reinterpret_cast<const float*>(ra);
  p.rk = reinterpret_cast<const float*>(rk);
  p.ya = reinterpret_cast<const int64_t*>(ya);
  p.yk = reinterpret_cast<const int64_t*>(yk);
  p.ignore = ignore_label;
  p.N = N;
  p.K = K;
  p.topk = topk;
  p.D = int(D);
  p.values = reinterpret_cast<float*>(values);
  p.indices = reinterpret_cast<int64_t*>(indices);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == "bf16") launch_d<Bf16>(p, s);
  else if (dtype == "fp16") launch_d<F16>(p, s);
  else if (dtype == "fp32") launch_d<F32>(p, s);
  else throw std::invalid_argument("dtype must be 'bf16', 'fp16' or 'fp32', got '" + dtype + "'");
}

}  // namespace ak
