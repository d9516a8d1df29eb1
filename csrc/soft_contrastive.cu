// Soft-label contrastive distillation loss on tensor cores: forward statistics, row gradient and key gradient,
// FlashAttention-2-shaped (a warp owns 16 rows, key tiles stream through double-buffered shared memory, online
// statistics in registers), deterministic (every output element written once, by one warp, in a fixed order).
//
// Normalisation is fused as scales: ŝ_i = rs_i s_i, t̂_i = rt_i t_i, k̂_j = rk_j k_j (inverse norms, or ones).
//   a_ij = ŝ_i·k̂_j / τ_s,  b_ij = t̂_i·k̂_j / τ_t,  q_i = softmax_j(a_ij),  p_i = softmax_j(b_ij)
//   loss_i = KL(p_i || q_i) = Σ_j p_ij (b_ij - a_ij) - lse_t,i + lse_s,i
//   ds0_i  = (q_i - p_i) K̂ / τ_s                                    (dL/dŝ_i = g_i ds0_i)
//   dK̂_j   = Σ_i g_i [ (q_ij - p_ij) ŝ_i / τ_s + p_ij (log p_ij - log q_ij - loss_i) t̂_i / τ_t ]
// The kernels work in base 2 with the scales folded: x = s·k rs rk log2(e) / τ_s, so softmax terms are exp2(x - m)
// (one MUFU.EX2 per term) and lse = ln 2 (m + log2 l).
//
// Three kernels, 9 GEMM-equivalents for forward + backward (the 5 of the floor plus recomputation):
//   soft_forward_kernel   row-owned: a, b tiles (2 GEMMs), online (m, l) for q and p and the KL in its shifted,
//                         pivoted form (below); stores loss, lse_s, lse_t, pivot, pivot_r (20 bytes a row).
//   soft_row_grad_kernel  row-owned: recomputes a, b (2 GEMMs), z = (q - p) rk / τ_s in fp32 from the stored lse
//                         (no cancellation before rounding), then ds0 += z K (1 GEMM) with z as the A operand
//                         straight from the logits' accumulator registers.
//   soft_key_grad_kernel  key-owned (no atomics): recomputes aᵀ, bᵀ for its keys against streamed row tiles
//                         (2 GEMMs), z_s = g rs (q - p) / τ_s, z_t = g rt p (ln p - ln q - loss) / τ_t (pivot_r at
//                         the row's pivot key), then dK̂ += z_s S + z_t T (2 GEMMs).
// Per-CTA tiles and shared memory come from rows_cfg / keys_cfg (one place, also read by launch_plans).
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda_compat.h"
#include "launch_plans.h"
#include "launchers.h"
#include "tc_tiles.cuh"

namespace ak {

struct SoftParams {
  Src s, t, k;
  const float *rs, *rt, *rk;  // inverse norms (N,), (N,), (K,)
  int64_t N, K;
  int D;                      // real feature size (tiles are zero beyond it)
  float cs, ct;               // log2(e) / τ_s, log2(e) / τ_t
  float inv_tau_s, inv_tau_t;
  float *loss, *lse_s, *lse_t;  // written by the forward, read by the gradients
  int* pivot;                   // (N,) the row's largest teacher logit's key (the first among ties)
  float* pivot_r;               // (N,) (ln p - ln q)[pivot] - loss, accumulated without cancellation
  float* ds0;                   // (N, D) row gradient
  const float* g;               // (N,) upstream gradient of the per-row losses
  float* dk;                    // (K, D) key gradient
};

// Row-owned kernels: BM rows resident (student and teacher tiles), BN keys per streamed tile (with their inverse
// norms), STAGES buffers.
struct RowsCfg {
  int bm, bn, stages;
};
template <class T, int D>
AK_HD_CONSTEXPR RowsCfg rows_cfg() {
  if constexpr (!is_f32<T>) return D <= 128 ? RowsCfg{64, 64, 2} : D == 256 ? RowsCfg{48, 32, 2} : RowsCfg{32, 16, 2};
  else return D == 64 ? RowsCfg{64, 32, 2} : D == 128 ? RowsCfg{48, 32, 2} : D == 256 ? RowsCfg{32, 16, 2} : RowsCfg{16, 8, 2};
}
template <class T, int D>
AK_HD_CONSTEXPR int64_t rows_smem() {
  constexpr RowsCfg c = rows_cfg<T, D>();
  return 2 * tile_bytes<T, D>(c.bm) + c.stages * (tile_bytes<T, D>(c.bn) + 4 * c.bn) + kMaxTileRows * 8;
}

// Key-owned kernel: BK keys resident, BM rows per streamed tile (student + teacher + kRowVecs per-row floats).
struct KeysCfg {
  int bk, bm, stages;
};
template <class T, int D>
AK_HD_CONSTEXPR KeysCfg keys_cfg() {
  if constexpr (!is_f32<T>) return D <= 128 ? KeysCfg{64, 64, 2} : D == 256 ? KeysCfg{32, 32, 2} : KeysCfg{32, 16, 2};
  else return D == 64 ? KeysCfg{64, 64, 2} : D == 128 ? KeysCfg{32, 32, 2} : D == 256 ? KeysCfg{32, 16, 2} : KeysCfg{16, 8, 2};
}
// per streamed row i: rs_i log2(e)/τ_s, rt_i log2(e)/τ_t, lse_s,i log2(e), lse_t,i log2(e), g_i rs_i/τ_s,
// g_i rt_i ln(2)/τ_t, loss_i log2(e), pivot_r,i log2(e), pivot_i (int)
constexpr int kRowVecs = 9;
template <class T, int D>
AK_HD_CONSTEXPR int64_t keys_smem() {
  constexpr KeysCfg c = keys_cfg<T, D>();
  return tile_bytes<T, D>(c.bk) + c.stages * (2 * tile_bytes<T, D>(c.bm) + kRowVecs * 4 * c.bm) + c.bk * 8;  // bases
}

// Gradient outputs are computed in slices of DO features (grid.y): a 16 x DO fp32 accumulator per warp is
// 64 registers at DO = 128; wider slices would spill.
template <int D>
AK_HD_CONSTEXPR int out_slice() {
  return D < 128 ? D : 128;
}

template <class T, int D>
AK_HD_CONSTEXPR bool fits() {
  return rows_smem<T, D>() <= kSmemLimit && keys_smem<T, D>() <= kSmemLimit;
}
static_assert(fits<Bf16, 64>() && fits<Bf16, 128>() && fits<Bf16, 256>() && fits<Bf16, 512>(), "bf16 tiles");
static_assert(fits<F32, 64>() && fits<F32, 128>() && fits<F32, 256>() && fits<F32, 512>(), "fp32 tiles");

// A logit of a column past K: finite and far below every real logit. Scaled by a large c = rs log2(e) / τ (tiny
// rows) it can become -inf; the one place that subtracts two masked values, the forward's KL cross term, guards
// against that -inf - (-inf).
constexpr float kMasked = -1e30f;

// The streamed key tile j: keys and their inverse norms (0 past K) into stage s.
template <class T, int D, int BN, int THREADS>
AK_DEV void stage_keys(const SoftParams& p, typename T::Elem* sK, float* sRk, int s, int j) {
  constexpr int LD = D + T::kPad;
  const int64_t key0 = int64_t(j) * BN;
  stream_tile<T, BN, D, THREADS>(sK + s * BN * LD, p.k, key0, p.K, p.D);
  static_assert(BN <= THREADS, "one thread per key");
  const int c = threadIdx.x;
  if (c < BN) sRk[s * BN + c] = key0 + c < p.K ? p.rk[key0 + c] : 0.f;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward statistics. Per lane: rows h = 0, 1 (g and g + 8 of its warp's 16), columns 2t, 2t + 1 of each 8-key
// block. With y = s·k rk (the key factor only), the base-2 logit is x = c y, c = rs log2(e)/τ > 0, so the tile max
// is c max(y) and the softmax terms exp2(c y - m) are one FFMA and one MUFU each. The KL never forms the logits'
// size 1/τ again (at τ = 1e-4 they are ~1e4 and KL = Σ p (x_t - x_s) - lse_t + lse_s would cancel to far below
// their fp32 rounding): with u = c y - m (the exp2 arguments), d = u_s - u_t, and the row's pivot j* (its largest
// teacher logit, the first among ties) with Δ = d_j*,
//   R = Σ_j p̃_j (d_j - Δ)  (p̃ = exp2(u_t)),   r = ln2 R / l_t = Σ_j p_j (δ_j* - δ_j)   (δ = ln p - ln q),
//   loss = δ_j* - r = ln2 (-Δ - log2 l_t + log2 l_s - R / l_t).
// R's term is exactly 0 at the pivot (d and Δ are the same number) and of the size of its own p_j elsewhere. r and
// the pivot go to the key gradient, whose teacher term p (δ - loss) is p r at the pivot. R is rescaled with the
// teacher's running max like l_t, and re-referenced when the pivot moves (R += l_t (Δ_old - Δ_new)): rare after the
// first tiles, so the pivot search runs in a warp-uniform branch. The row max is quad-uniform after each tile
// (quad_max); the sums stay per lane until the end.
template <class T, int D>
__global__ void __launch_bounds__(rows_cfg<T, D>().bm * 2) soft_forward_kernel(SoftParams p) {
  constexpr RowsCfg C = rows_cfg<T, D>();
  constexpr int BM = C.bm, BN = C.bn, ST = C.stages, THREADS = BM * 2, NB = BN / 8, LD = D + T::kPad;
  static_assert(ST == 2, "the pipeline below is written for two stages");
  using E = typename T::Elem;
  AK_DYNAMIC_SMEM(smem);
  E* sS = reinterpret_cast<E*>(smem);
  E* sT = sS + BM * LD;
  E* sK = sT + BM * LD;
  float* sRk = reinterpret_cast<float*>(sK + ST * BN * LD);
  int64_t* bases = reinterpret_cast<int64_t*>(sRk + ST * BN);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * BM, myrow = row0 + 16 * warp + (lane >> 2);
  const int tiles = int(ceil_div(p.K, BN));
#pragma unroll 1
  for (int w = 0; w < 2; ++w) load_tile<T, BM, D, THREADS>(w ? sT : sS, w ? p.t : p.s, row0, p.N, p.D, bases);

  // per row h: running (m, l) of both softmaxes, R, and the pivot (its key, and its y_s, y_t)
  float cs[2], ct[2], m_s[2], l_s[2], m_t[2], l_t[2], R[2], ys_p[2], yt_p[2];
  int piv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = myrow + 8 * h;
    cs[h] = n < p.N ? p.rs[n] * p.cs : 0.f;
    ct[h] = n < p.N ? p.rt[n] * p.ct : 0.f;
    m_s[h] = m_t[h] = -INFINITY;
    l_s[h] = l_t[h] = R[h] = ys_p[h] = yt_p[h] = 0.f;
    piv[h] = 0;
  }
  const E* const a[2] = {sS + 16 * warp * LD, sT + 16 * warp * LD};

  // j = -1 only issues tile 0 (with the row tiles in the same group): one load site per tile shape keeps the
  // code small. At j >= 0: tile j has landed for every thread and every warp is done with the buffer tile j + 1
  // goes to, which then streams in while tile j is computed.
  for (int j = -1; j < tiles; ++j) {
    if (j >= 0) cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < tiles) stage_keys<T, D, BN, THREADS>(p, sK, sRk, (j + 1) % ST, j + 1);
    cp_async_commit();
    if (j < 0) continue;

    float f[2][NB][4] = {};
    warp_logits<T, D, NB, 2>(a, sK + (j % ST) * BN * LD, f);
    const int valid = p.K - int64_t(j) * BN < BN ? int(p.K - int64_t(j) * BN) : BN;
    float rk[NB][2], bias[NB][2];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * nb + 2 * t + e;
        rk[nb][e] = sRk[(j % ST) * BN + c];
        bias[nb][e] = c < valid ? 0.f : kMasked;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float ys[NB][2], yt[NB][2], my_s = kMasked, my_t = kMasked;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          ys[nb][e] = fmaf(f[0][nb][2 * h + e], rk[nb][e], bias[nb][e]);
          yt[nb][e] = fmaf(f[1][nb][2 * h + e], rk[nb][e], bias[nb][e]);
          my_s = fmaxf(my_s, ys[nb][e]);
          my_t = fmaxf(my_t, yt[nb][e]);
        }
      // every tile holds a valid key for every row, so the running maxima are finite from the first tile on
      const float tmax = quad_max(my_t);
      const float ms = fmaxf(m_s[h], cs[h] * quad_max(my_s)), mt = fmaxf(m_t[h], ct[h] * tmax);
      // Δ of the current pivot at this tile's references; where the pivot moves into this tile (strictly greater:
      // ties keep the lower key), its d read from the tile (the same FFMAs as the terms below, so its own term is
      // exactly 0), and R re-referenced to it
      float delta = fmaf(ys_p[h], cs[h], -ms) - fmaf(yt_p[h], ct[h], -mt);
      const bool fresh = ct[h] * tmax > m_t[h];
      if (__any_sync(0xffffffffu, fresh)) {
        int col = BN;  // the first column holding the tile max: this lane's first, then the quad's smallest
#pragma unroll
        for (int nb = NB - 1; nb >= 0; --nb)
#pragma unroll
          for (int e = 1; e >= 0; --e)
            if (yt[nb][e] == tmax) col = 8 * nb + 2 * t + e;
#pragma unroll
        for (int x = 1; x <= 2; x <<= 1) {
          const int other = __shfl_xor_sync(0xffffffffu, col, x);
          col = other < col ? other : col;
        }
        float y_s = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (8 * nb + 2 * t + e == col) y_s = ys[nb][e];
        y_s = __shfl_sync(0xffffffffu, y_s, (lane & ~3) | ((col & 7) >> 1));  // from the quad lane holding it
        if (fresh) {
          const float d_new = fmaf(y_s, cs[h], -ms) - fmaf(tmax, ct[h], -mt);
          R[h] = fmaf(l_t[h], delta - d_new, R[h]);
          delta = d_new;
          piv[h] = j * BN + col;
          ys_p[h] = y_s;
          yt_p[h] = tmax;
        }
      }
      float sum_s = 0.f, sum_t = 0.f, acc = 0.f;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float us = fmaf(ys[nb][e], cs[h], -ms), ut = fmaf(yt[nb][e], ct[h], -mt);
          const float pt = fast_exp2(ut);
          sum_s += fast_exp2(us);
          sum_t += pt;
          // a masked column has us = ut = -inf once kMasked * c overflows (tiny rows: c = rs log2(e) / τ is large);
          // fmaxf drops the NaN of -inf - (-inf) (CUDA's fmaxf returns the other operand), so pt = 0 adds 0
          acc = fmaf(pt, fmaxf((us - ut) - delta, -FLT_MAX), acc);
        }
      const float alpha_s = fast_exp2(m_s[h] - ms), alpha_t = fast_exp2(m_t[h] - mt);
      l_s[h] = fmaf(l_s[h], alpha_s, sum_s);
      l_t[h] = fmaf(l_t[h], alpha_t, sum_t);
      R[h] = fmaf(R[h], alpha_t, acc);
      m_s[h] = ms;
      m_t[h] = mt;
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float ls = quad_sum(l_s[h]), lt = quad_sum(l_t[h]), rq = quad_sum(R[h]);
    // the row index from a fresh read of the thread index: kept live across the key loop, ptxas spilled it to the
    // stack (fp32 D = 64, 256 on sm_90)
    const int tid = fresh_thread_index();
    const int64_t n = row0 + 16 * (tid >> 5) + ((tid & 31) >> 2) + 8 * h;
    if (t == 0 && n < p.N) {
      const float log_ls = log2f(ls), log_lt = log2f(lt), r2 = div_normal(rq, lt);  // lt >= 1: its largest term is 1
      const float delta = fmaf(ys_p[h], cs[h], -m_s[h]) - fmaf(yt_p[h], ct[h], -m_t[h]);
      p.lse_s[n] = (m_s[h] + log_ls) * kLn2;
      p.lse_t[n] = (m_t[h] + log_lt) * kLn2;
      p.loss[n] = (log_ls - log_lt - delta - r2) * kLn2;
      p.pivot[n] = piv[h];
      p.pivot_r[n] = r2 * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row gradient: ds0[rows, c0 .. c0 + DO) where c0 = blockIdx.y DO. q = exp2(c_s y_s - lse_s log2 e), likewise p.
template <class T, int D>
__global__ void __launch_bounds__(rows_cfg<T, D>().bm * 2, 1) soft_row_grad_kernel(SoftParams p) {
  constexpr RowsCfg C = rows_cfg<T, D>();
  constexpr int BM = C.bm, BN = C.bn, ST = C.stages, THREADS = BM * 2, NB = BN / 8, LD = D + T::kPad;
  constexpr int DO = out_slice<D>(), NO = DO / 8;
  static_assert(ST == 2, "the pipeline below is written for two stages");
  using E = typename T::Elem;
  AK_DYNAMIC_SMEM(smem);
  E* sS = reinterpret_cast<E*>(smem);
  E* sT = sS + BM * LD;
  E* sK = sT + BM * LD;
  float* sRk = reinterpret_cast<float*>(sK + ST * BN * LD);
  int64_t* bases = reinterpret_cast<int64_t*>(sRk + ST * BN);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * BM, myrow = row0 + 16 * warp + (lane >> 2);
  const int c0 = int(blockIdx.y) * DO;
  const int tiles = int(ceil_div(p.K, BN));
#pragma unroll 1
  for (int w = 0; w < 2; ++w) load_tile<T, BM, D, THREADS>(w ? sT : sS, w ? p.t : p.s, row0, p.N, p.D, bases);

  float cs[2], ct[2], ls[2], lt[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = myrow + 8 * h;
    const bool ok = n < p.N;  // rows past N: q = p = 1 below, so z = 0
    cs[h] = ok ? p.rs[n] * p.cs : 0.f;
    ct[h] = ok ? p.rt[n] * p.ct : 0.f;
    ls[h] = ok ? p.lse_s[n] * kLog2e : 0.f;
    lt[h] = ok ? p.lse_t[n] * kLog2e : 0.f;
  }
  const E* const a[2] = {sS + 16 * warp * LD, sT + 16 * warp * LD};
  float o[NO][4] = {};
  ScaleF16 range;

  for (int j = -1; j < tiles; ++j) {  // as in the forward
    if (j >= 0) cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < tiles) stage_keys<T, D, BN, THREADS>(p, sK, sRk, (j + 1) % ST, j + 1);
    cp_async_commit();
    if (j < 0) continue;
    const E* kt = sK + (j % ST) * BN * LD;

    float f[2][NB][4] = {};
    warp_logits<T, D, NB, 2>(a, kt, f);
    float rk[NB][2], bound = 0.f;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        rk[nb][e] = sRk[(j % ST) * BN + 8 * nb + 2 * t + e];  // 0 past K (z is zeroed there below)
        bound = fmaxf(bound, rk[nb][e]);
      }
    const int valid = p.K - int64_t(j) * BN < BN ? int(p.K - int64_t(j) * BN) : BN;
    // fp16: |z| <= rk / τ_s (|q - p| <= 1), so the range scale is known before z, and z is rounded as it is made
    const float zf = p.inv_tau_s * (is_f16<T> ? range.update(bound * p.inv_tau_s, o) : 1.f);
    float z[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float rz = rk[nb][e] * zf;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float q = fast_exp2(fmaf(f[0][nb][2 * h + e] * rk[nb][e], cs[h], -ls[h]));
          const float pp = fast_exp2(fmaf(f[1][nb][2 * h + e] * rk[nb][e], ct[h], -lt[h]));
          z[nb][2 * h + e] = (q - pp) * rz;  // the difference in fp32, before any rounding
        }
      }
    // Columns past K (the ragged last tile only: a block-uniform branch) contribute exactly 0. Their logit reads 0, so
    // q = exp2(-lse_s log2 e), which overflows to inf once lse < -88.7 (every logit of the row below about -87), and
    // (inf - p) * 0 would be NaN.
    if (valid < BN) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            if (8 * nb + 2 * t + e >= valid) z[nb][2 * h + e] = 0.f;
    }
    warp_values<T, D, BN, NO>(z, 1.f, kt, c0, o);
  }
  cp_async_wait<0>();
  const float unscale = is_f16<T> ? range.unscale() : 1.f;
  store_values<NO>(o, unscale, p.ds0, myrow, p.N, p.D, c0);
}

// ---------------------------------------------------------------------------------------------------------------
// Key gradient: dk[keys, c0 .. c0 + DO). The warp's 16 keys are the rows of its accumulators (h = 0, 1: keys g and
// g + 8), the streamed rows its columns: x_q = y_s c_s - lse_s log2 e with y = s·k rk, likewise x_p, and
// ln p - ln q - loss = ln 2 (x_p - x_q - loss log2 e).
template <class T, int D>
__global__ void __launch_bounds__(keys_cfg<T, D>().bk * 2, 1) soft_key_grad_kernel(SoftParams p) {
  constexpr KeysCfg C = keys_cfg<T, D>();
  constexpr int BK = C.bk, BM = C.bm, ST = C.stages, THREADS = BK * 2, NB = BM / 8, LD = D + T::kPad;
  constexpr int DO = out_slice<D>(), NO = DO / 8;
  constexpr int64_t STAGE = 2 * tile_bytes<T, D>(BM) + kRowVecs * 4 * BM;  // bytes
  static_assert(ST == 2, "the pipeline below is written for two stages");
  using E = typename T::Elem;
  AK_DYNAMIC_SMEM(smem);
  E* sK = reinterpret_cast<E*>(smem);
  unsigned char* stages = smem + tile_bytes<T, D>(BK);
  int64_t* bases = reinterpret_cast<int64_t*>(stages + ST * STAGE);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int64_t key0 = int64_t(blockIdx.x) * BK, mykey = key0 + 16 * warp + (lane >> 2);
  const int c0 = int(blockIdx.y) * DO;
  const int tiles = int(ceil_div(p.N, BM));

  // Stage s: student tile, teacher tile, then the per-row factors (plain stores).
  auto stage_rows = [&](int s, int it) {
    unsigned char* base = stages + s * STAGE;
    const int64_t r0 = int64_t(it) * BM;
#pragma unroll 1
    for (int w = 0; w < 2; ++w)
      stream_tile<T, BM, D, THREADS>(reinterpret_cast<E*>(base + w * tile_bytes<T, D>(BM)), w ? p.t : p.s, r0, p.N, p.D);
    float* v = reinterpret_cast<float*>(base + 2 * tile_bytes<T, D>(BM));
    static_assert(BM <= THREADS, "one thread per row");
    if (const int r = threadIdx.x; r < BM) {
      const int64_t i = r0 + r;
      const bool ok = i < p.N;  // rows past N get zero weights, so they contribute nothing
      const float rs = ok ? p.rs[i] : 0.f, rt = ok ? p.rt[i] : 0.f, gi = ok ? p.g[i] : 0.f;
      v[0 * BM + r] = rs * p.cs;
      v[1 * BM + r] = rt * p.ct;
      v[2 * BM + r] = ok ? p.lse_s[i] * kLog2e : 0.f;
      v[3 * BM + r] = ok ? p.lse_t[i] * kLog2e : 0.f;
      v[4 * BM + r] = gi * rs * p.inv_tau_s;
      v[5 * BM + r] = gi * rt * p.inv_tau_t * kLn2;
      v[6 * BM + r] = ok ? p.loss[i] * kLog2e : 0.f;
      v[7 * BM + r] = ok ? p.pivot_r[i] * kLog2e : 0.f;
      reinterpret_cast<int*>(v)[8 * BM + r] = ok ? p.pivot[i] : -1;
    }
  };

  load_tile<T, BK, D, THREADS>(sK, p.k, key0, p.K, p.D, bases);
  float rk[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) rk[h] = mykey + 8 * h < p.K ? p.rk[mykey + 8 * h] : 0.f;
  const bool ragged = key0 + BK > p.K;  // the last key block: some of its keys are past K
  const int key_of[2] = {int(mykey), int(mykey + 8)};  // compared with the rows' pivots (K < 2^31: launch checks)
  float o[NO][4] = {};
  ScaleF16 range;

  for (int it = -1; it < tiles; ++it) {  // it = -1 only stages row tile 0 (see the forward)
    if (it >= 0) cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < tiles) stage_rows((it + 1) % ST, it + 1);
    cp_async_commit();
    if (it < 0) continue;
    unsigned char* base = stages + (it % ST) * STAGE;
    const E* sS = reinterpret_cast<const E*>(base);
    const E* sT = reinterpret_cast<const E*>(base + tile_bytes<T, D>(BM));
    const float* v = reinterpret_cast<const float*>(base + 2 * tile_bytes<T, D>(BM));

    float f[2][NB][4] = {};
    const E* const b[2] = {sS, sT};
    warp_logits_2b<T, D, NB>(sK + 16 * warp * LD, b, f);
    float zs[NB][4], zt[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int r = 8 * nb + 2 * t;  // this lane's two columns r, r + 1: one 8-byte load per factor
      const float2 c_s = *reinterpret_cast<const float2*>(v + r), c_t = *reinterpret_cast<const float2*>(v + BM + r);
      const float2 l_q = *reinterpret_cast<const float2*>(v + 2 * BM + r);
      const float2 l_p = *reinterpret_cast<const float2*>(v + 3 * BM + r);
      const float2 w_s = *reinterpret_cast<const float2*>(v + 4 * BM + r);
      const float2 w_t = *reinterpret_cast<const float2*>(v + 5 * BM + r);
      const float2 l_2 = *reinterpret_cast<const float2*>(v + 6 * BM + r);
      const float2 r_2 = *reinterpret_cast<const float2*>(v + 7 * BM + r);
      const int2 piv = *reinterpret_cast<const int2*>(v + 8 * BM + r);
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float xq = fmaf(f[0][nb][2 * h + e] * rk[h], e ? c_s.y : c_s.x, -(e ? l_q.y : l_q.x));
          const float xp = fmaf(f[1][nb][2 * h + e] * rk[h], e ? c_t.y : c_t.x, -(e ? l_p.y : l_p.x));
          const float q = fast_exp2(xq), pp = fast_exp2(xp);
          const float a_s = (e ? w_s.y : w_s.x) * (q - pp);
          // (ln p - ln q - loss) log2 e, or at the row's pivot key the forward's pivot_r (recomputed there it would
          // be a difference of numbers of size 1/τ that cancel when p is nearly one-hot: small τ_t)
          const float c_t = key_of[h] == (e ? piv.y : piv.x) ? (e ? r_2.y : r_2.x) : xp - xq - (e ? l_2.y : l_2.x);
          const float a_t = (e ? w_t.y : w_t.x) * pp * c_t;
          zs[nb][2 * h + e] = a_s;
          zt[nb][2 * h + e] = a_t;
        }
    }
    // Keys past K (the ragged last key block only: a block-uniform branch) contribute exactly 0: their logits read 0,
    // so q = exp2(-lse_s log2 e) can be inf (every logit of a row below about -87), and their rows of z would be inf
    // or NaN (harmless for their own output rows, which are not stored, but not for fp16's shared range scale).
    if (ragged) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (mykey + 8 * h >= p.K)
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) zs[nb][2 * h + e] = zt[nb][2 * h + e] = 0.f;
    }
    float scale = 1.f;
    if constexpr (is_f16<T>) {
      float absmax = 0.f;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) absmax = fmaxf(absmax, fmaxf(fabsf(zs[nb][i]), fabsf(zt[nb][i])));
      scale = range.update(absmax, o);
    }
    warp_values<T, D, BM, NO>(zs, scale, sS, c0, o);
    warp_values<T, D, BM, NO>(zt, scale, sT, c0, o);
  }
  cp_async_wait<0>();
  const float unscale = is_f16<T> ? range.unscale() : 1.f;
  store_values<NO>(o, unscale, p.dk, mykey, p.K, p.D, c0);
}

// ---------------------------------------------------------------------------------------------------------------
// Plans and launches.
namespace {

enum class Kind { Forward, RowGrad, KeyGrad };

template <class T, int D>
LaunchPlan plan_of(Kind kind, int64_t N, int64_t K) {
  const std::string args = std::string("<") + T::name + ", " + std::to_string(D) + ">(ak::SoftParams)";
  // loops per CTA: the streamed tiles, then the logits' feature loop inside each where it stays a loop
  auto trips = [](int64_t tiles) {
    constexpr int k = logits_loop_trips<T, D>();
    return k > 1 ? std::vector<int64_t>{tiles, k} : std::vector<int64_t>{tiles};
  };
  if (kind == Kind::KeyGrad) {
    constexpr KeysCfg c = keys_cfg<T, D>();
    return LaunchPlan{"void ak::soft_key_grad_kernel" + args, ceil_div(K, c.bk), unsigned(D / out_slice<D>()),
                      unsigned(c.bk * 2), keys_smem<T, D>(), trips(ceil_div(N, c.bm))};
  }
  constexpr RowsCfg c = rows_cfg<T, D>();
  const bool fwd = kind == Kind::Forward;
  return LaunchPlan{std::string(fwd ? "void ak::soft_forward_kernel" : "void ak::soft_row_grad_kernel") + args,
                    ceil_div(N, c.bm), fwd ? 1u : unsigned(D / out_slice<D>()), unsigned(c.bm * 2),
                    rows_smem<T, D>(), trips(ceil_div(K, c.bn))};
}

template <class T>
LaunchPlan plan_for_d(Kind kind, int64_t N, int64_t K, int64_t D) {
  switch (feature_bucket(D)) {
    case 64: return plan_of<T, 64>(kind, N, K);
    case 128: return plan_of<T, 128>(kind, N, K);
    case 256: return plan_of<T, 256>(kind, N, K);
    case 512: return plan_of<T, 512>(kind, N, K);
  }
  throw std::invalid_argument("soft_contrastive CUDA kernels support D <= 512 features, got D = " +
                              std::to_string(D) + " (use backend 'triton' or 'chunked')");
}

LaunchPlan plan_for(Kind kind, const std::string& dtype, int64_t N, int64_t K, int64_t D) {
  if (dtype == "bf16") return plan_for_d<Bf16>(kind, N, K, D);
  if (dtype == "fp16") return plan_for_d<F16>(kind, N, K, D);
  if (dtype == "fp32") return plan_for_d<F32>(kind, N, K, D);
  throw std::invalid_argument("dtype must be 'bf16', 'fp16' or 'fp32', got '" + dtype + "'");
}

template <class T, int D>
void launch_one(Kind kind, const SoftParams& p, cudaStream_t stream) {
  const LaunchPlan plan = plan_of<T, D>(kind, p.N, p.K);
  const dim3 grid(plan.grid_x, plan.grid_y), block(plan.block);
  const size_t smem = size_t(plan.dynamic_smem);
  void (*kernel)(SoftParams) = kind == Kind::Forward   ? soft_forward_kernel<T, D>
                                : kind == Kind::RowGrad ? soft_row_grad_kernel<T, D>
                                                        : soft_key_grad_kernel<T, D>;
  AK_LAUNCH(kernel, grid, block, smem, stream, p);
  check_launch(plan.kernel.c_str());
}

template <class T>
void launch_d(Kind kind, const SoftParams& p, cudaStream_t stream) {
  switch (feature_bucket(p.D)) {
    case 64: return launch_one<T, 64>(kind, p, stream);
    case 128: return launch_one<T, 128>(kind, p, stream);
    case 256: return launch_one<T, 256>(kind, p, stream);
    case 512: return launch_one<T, 512>(kind, p, stream);
  }
  throw std::invalid_argument("soft_contrastive CUDA kernels support D <= 512 features, got D = " +
                              std::to_string(p.D) + " (use backend 'triton' or 'chunked')");
}

void launch(Kind kind, const std::string& dtype, const SoftParams& p, uintptr_t stream) {
  // the operands a kernel streams in its main loop must take the cp.async path (csrc/tc_tiles.cuh stream_tile)
  const bool streamed_ok = kind == Kind::KeyGrad ? p.s.uniform && p.t.uniform : p.k.uniform;
  if (!streamed_ok)
    throw std::invalid_argument(std::string(kind == Kind::KeyGrad ? "rows s and t" : "keys k") +
                                " must be uniform rows (feature stride 1, 16-byte aligned rows at one stride) for "
                                "this kernel: pass a padded copy (see uniform_rows)");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == "bf16") launch_d<Bf16>(kind, p, s);
  else if (dtype == "fp16") launch_d<F16>(kind, p, s);
  else if (dtype == "fp32") launch_d<F32>(kind, p, s);
  else throw std::invalid_argument("dtype must be 'bf16', 'fp16' or 'fp32', got '" + dtype + "'");
}

SoftParams params(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg sc, int64_t N, int64_t K,
                  int64_t D, float inv_tau_s, float inv_tau_t) {
  const int bytes = dtype == "fp32" ? 4 : 2;
  if (K > INT32_MAX)  // pivots are int32 key indices
    throw std::invalid_argument("soft_contrastive CUDA kernels take K < 2^31 keys, got K = " + std::to_string(K));
  SoftParams p{};
  p.s = src_of(s, N, bytes);
  p.t = src_of(t, N, bytes);
  p.k = src_of(k, K, bytes);
  p.rs = reinterpret_cast<const float*>(sc.rs);
  p.rt = reinterpret_cast<const float*>(sc.rt);
  p.rk = reinterpret_cast<const float*>(sc.rk);
  p.N = N;
  p.K = K;
  p.D = int(D);
  p.cs = kLog2e * inv_tau_s;
  p.ct = kLog2e * inv_tau_t;
  p.inv_tau_s = inv_tau_s;
  p.inv_tau_t = inv_tau_t;
  return p;
}

}  // namespace

std::vector<LaunchPlan> soft_contrastive_plans(const std::string& mode, const std::string& dtype, int64_t N,
                                               int64_t K, int64_t D) {
  if (N == 0 || K == 0) return {};
  if (mode == "key_grad") return {plan_for(Kind::KeyGrad, dtype, N, K, D)};
  std::vector<LaunchPlan> plans{plan_for(Kind::Forward, dtype, N, K, D)};
  if (mode == "forward_grad") plans.push_back(plan_for(Kind::RowGrad, dtype, N, K, D));
  return plans;
}

void soft_contrastive_forward(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg scales, int64_t N,
                              int64_t K, int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss, uintptr_t lse_s,
                              uintptr_t lse_t, uintptr_t pivot, uintptr_t pivot_r, uintptr_t stream) {
  if (N == 0 || K == 0) return;
  SoftParams p = params(dtype, s, t, k, scales, N, K, D, inv_tau_s, inv_tau_t);
  p.loss = reinterpret_cast<float*>(loss);
  p.lse_s = reinterpret_cast<float*>(lse_s);
  p.lse_t = reinterpret_cast<float*>(lse_t);
  p.pivot = reinterpret_cast<int*>(pivot);
  p.pivot_r = reinterpret_cast<float*>(pivot_r);
  launch(Kind::Forward, dtype, p, stream);
}

void soft_contrastive_row_grad(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg scales,
                               int64_t N, int64_t K, int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t lse_s,
                               uintptr_t lse_t, uintptr_t ds0, uintptr_t stream) {
  if (N == 0 || K == 0) return;
  SoftParams p = params(dtype, s, t, k, scales, N, K, D, inv_tau_s, inv_tau_t);
  p.lse_s = reinterpret_cast<float*>(lse_s);
  p.lse_t = reinterpret_cast<float*>(lse_t);
  p.ds0 = reinterpret_cast<float*>(ds0);
  launch(Kind::RowGrad, dtype, p, stream);
}

void soft_contrastive_key_grad(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg scales,
                               int64_t N, int64_t K, int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss,
                               uintptr_t lse_s, uintptr_t lse_t, uintptr_t pivot, uintptr_t pivot_r, uintptr_t g,
                               uintptr_t dk, uintptr_t stream) {
  if (N == 0 || K == 0) return;
  SoftParams p = params(dtype, s, t, k, scales, N, K, D, inv_tau_s, inv_tau_t);
  p.loss = reinterpret_cast<float*>(loss);
  p.lse_s = reinterpret_cast<float*>(lse_s);
  p.lse_t = reinterpret_cast<float*>(lse_t);
  p.pivot = reinterpret_cast<int*>(pivot);
  p.pivot_r = reinterpret_cast<float*>(pivot_r);
  p.g = reinterpret_cast<const float*>(g);
  p.dk = reinterpret_cast<float*>(dk);
  launch(Kind::KeyGrad, dtype, p, stream);
}

}  // namespace ak
