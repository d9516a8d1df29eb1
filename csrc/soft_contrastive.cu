// Soft-label contrastive distillation loss: fused forward, row-gradient and key-gradient kernels (fp32, SIMT).
//
// Normalisation is fused as scales: ŝ_i = rs_i s_i, t̂_i = rt_i t_i, k̂_j = rk_j k_j (inverse norms, or ones).
//   a_ij = ŝ_i·k̂_j / τ_s,  b_ij = t̂_i·k̂_j / τ_t,  q_i = softmax_j(a_ij),  p_i = softmax_j(b_ij)
//   loss_i = KL(p_i || q_i) = Σ_j p_ij (b_ij - a_ij) - lse_t,i + lse_s,i
//   ds0_i  = (q_i - p_i) K̂ / τ_s                                    (dL/dŝ_i = g_i ds0_i)
//   dK̂_j   = Σ_i g_i [ (q_ij - p_ij) ŝ_i / τ_s + p_ij (log p_ij - log q_ij - loss_i) t̂_i / τ_t ]
//
// Tiles of BM rows x BN keys; D streamed through shared memory in BK chunks. 128 threads: thread (r, g) with
// r = tid / 4 owns tile row r and keys g*8 .. g*8+7, and keeps its own online softmax statistics over those keys;
// the four partial statistics of a row are merged once at the end, so the key loop needs no cross-thread step.
// Every output element is written by one block in a fixed order: deterministic, no atomics.
#include <cmath>

#include "cuda_compat.h"
#include "launch_plans.h"
#include "launchers.h"
#include "tiles.cuh"

namespace ak {
namespace {

struct Stats {
  float m_s, l_s, m_t, l_t, acc;
};

// Merges (m, l) softmax partials; an empty partial has l == 0 and m == -inf.
__device__ __forceinline__ void merge(float& m, float& l, float& acc, float m2, float l2, float acc2) {
  if (l2 == 0.f) return;
  if (l == 0.f) { m = m2; l = l2; acc = acc2; return; }
  const float mx = fmaxf(m, m2), e1 = expf(m - mx), e2 = expf(m2 - mx);
  l = l * e1 + l2 * e2;
  acc = acc * e1 + acc2 * e2;
  m = mx;
}

__global__ void forward_kernel(Rows S, Rows T, Keys Kb, Scales sc, int64_t N, int64_t K, int64_t D, float inv_tau_s,
                               float inv_tau_t, float* loss, float* lse_s, float* lse_t) {
  __shared__ Tiles sh;
  __shared__ Stats part[THREADS];
  const int tid = threadIdx.x, r = tid / LANES, g = tid % LANES;
  const int64_t row0 = int64_t(blockIdx.x) * BM, n = row0 + r;
  const float cs = n < N ? sc.rs[n] * inv_tau_s : 0.f, ct = n < N ? sc.rt[n] * inv_tau_t : 0.f;
  float as[KPT], at[KPT];
  float m_s = -INFINITY, l_s = 0.f, m_t = -INFINITY, l_t = 0.f, acc = 0.f, unused = 0.f;
  for (int64_t key0 = 0; key0 < K; key0 += BN) {
    tile_dots(S, T, Kb, row0, N, key0, K, D, sh, as, at);
    for (int c = 0; c < KPT; ++c) {
      const int64_t j = key0 + g * KPT + c;
      if (j >= K) break;
      const float a = as[c] * cs * sc.rk[j], b = at[c] * ct * sc.rk[j];
      merge(m_s, l_s, unused, a, 1.f, 0.f);
      merge(m_t, l_t, acc, b, 1.f, b - a);
    }
  }
  part[tid] = Stats{m_s, l_s, m_t, l_t, acc};
  __syncthreads();
  if (g == 0 && n < N) {
    for (int o = 1; o < LANES; ++o) {
      const Stats& p = part[tid + o];
      merge(m_s, l_s, unused, p.m_s, p.l_s, 0.f);
      merge(m_t, l_t, acc, p.m_t, p.l_t, p.acc);
    }
    const float ls = m_s + logf(l_s), lt = m_t + logf(l_t);
    loss[n] = acc / l_t - lt + ls;
    lse_s[n] = ls;
    lse_t[n] = lt;
  }
}

__global__ void row_grad_kernel(Rows S, Rows T, Keys Kb, Scales sc, int64_t N, int64_t K, int64_t D, float inv_tau_s,
                                float inv_tau_t, const float* lse_s, const float* lse_t, float* ds0) {
  __shared__ Tiles sh;
  __shared__ float z[BM][BN + 1];
  const int tid = threadIdx.x, r = tid / LANES, g = tid % LANES;
  const int64_t row0 = int64_t(blockIdx.x) * BM, n = row0 + r;
  const float ls = n < N ? lse_s[n] : 0.f, lt = n < N ? lse_t[n] : 0.f;
  const float cs = n < N ? sc.rs[n] * inv_tau_s : 0.f, ct = n < N ? sc.rt[n] * inv_tau_t : 0.f;
  float as[KPT], at[KPT];
  for (int64_t key0 = 0; key0 < K; key0 += BN) {
    tile_dots(S, T, Kb, row0, N, key0, K, D, sh, as, at);
    for (int c = 0; c < KPT; ++c) {
      const int64_t j = key0 + g * KPT + c;
      const float rk = j < K ? sc.rk[j] : 0.f;
      // z = (q - p) rk / τ_s: the rk turns the raw key rows read below into k̂
      z[r][g * KPT + c] = (n < N && j < K)
          ? (expf(as[c] * cs * rk - ls) - expf(at[c] * ct * rk - lt)) * inv_tau_s * rk : 0.f;
    }
    __syncthreads();
    if (n < N) {
      const int64_t kmax = K - key0 < BN ? K - key0 : BN;
      for (int64_t d = g; d < D; d += LANES) {
        float sum = 0.f;
        for (int64_t c = 0; c < kmax; ++c) sum += z[r][c] * Kb.at(key0 + c, d);
        ds0[n * D + d] += sum;
      }
    }
    __syncthreads();
  }
}

__global__ void key_grad_kernel(Rows S, Rows T, Keys Kb, Scales sc, int64_t N, int64_t K, int64_t D, float inv_tau_s,
                                float inv_tau_t, const float* loss, const float* lse_s, const float* lse_t,
                                const float* gr, float* dk) {
  __shared__ Tiles sh;
  __shared__ float zs[BM][BN + 1];
  __shared__ float zt[BM][BN + 1];
  const int tid = threadIdx.x, r = tid / LANES, g = tid % LANES;
  const int64_t key0 = int64_t(blockIdx.x) * BN;
  float as[KPT], at[KPT];
  for (int64_t row0 = 0; row0 < N; row0 += BM) {
    tile_dots(S, T, Kb, row0, N, key0, K, D, sh, as, at);
    const int64_t n = row0 + r;
    const bool row_ok = n < N;
    const float gn = row_ok ? gr[n] : 0.f, ls = row_ok ? lse_s[n] : 0.f, lt = row_ok ? lse_t[n] : 0.f;
    const float ln = row_ok ? loss[n] : 0.f;
    const float rs = row_ok ? sc.rs[n] : 0.f, rt = row_ok ? sc.rt[n] : 0.f;
    for (int c = 0; c < KPT; ++c) {
      const int64_t j = key0 + g * KPT + c;
      const bool ok = row_ok && j < K;
      const float rk = j < K ? sc.rk[j] : 0.f;
      const float log_q = as[c] * rs * inv_tau_s * rk - ls, log_p = at[c] * rt * inv_tau_t * rk - lt;
      const float p = expf(log_p);
      // the rs, rt factors turn the raw rows read below into ŝ, t̂
      zs[r][g * KPT + c] = ok ? (expf(log_q) - p) * gn * inv_tau_s * rs : 0.f;
      zt[r][g * KPT + c] = ok ? p * (log_p - log_q - ln) * gn * inv_tau_t * rt : 0.f;
    }
    __syncthreads();
    // thread (c, lane): key c = tid / LANES, features lane, lane + LANES, ...
    const int64_t j = key0 + r;
    if (j < K) {
      const int64_t rmax = N - row0 < BM ? N - row0 : BM;
      for (int64_t d = g; d < D; d += LANES) {
        float sum = 0.f;
        for (int64_t i = 0; i < rmax; ++i) sum += zs[i][r] * S.at(row0 + i, d) + zt[i][r] * T.at(row0 + i, d);
        dk[j * D + d] += sum;
      }
    }
    __syncthreads();
  }
}

Scales scales_of(const ScalesArg& a) {
  return Scales{reinterpret_cast<const float*>(a.rs), reinterpret_cast<const float*>(a.rt),
                reinterpret_cast<const float*>(a.rk)};
}

// Demangled names of the kernels above (checked against the nvcc cubin's symbols in tests/test_cuda_kernels.py).
constexpr const char* kTail = "(ak::Rows, ak::Rows, ak::(anonymous namespace)::Keys, ak::(anonymous namespace)::Scales, long, long, long, float, float, ";
std::string name(const char* kernel, const char* rest) {
  return std::string("ak::(anonymous namespace)::") + kernel + kTail + rest;
}

// Tiles of BM rows (forward, row gradient) or BN keys (key gradient); loops per CTA: the key (or row) tiles, then
// the BK-wide feature chunks of tile_dots inside each.
LaunchPlan forward_plan(int64_t N, int64_t K, int64_t D) {
  return LaunchPlan{name("forward_kernel", "float*, float*, float*)"), blocks(N, BM), 1, THREADS, 0,
                    {(K + BN - 1) / BN, (D + BK - 1) / BK}};
}
LaunchPlan row_grad_plan(int64_t N, int64_t K, int64_t D) {
  return LaunchPlan{name("row_grad_kernel", "float const*, float const*, float*)"), blocks(N, BM), 1, THREADS, 0,
                    {(K + BN - 1) / BN, (D + BK - 1) / BK}};
}
LaunchPlan key_grad_plan(int64_t N, int64_t K, int64_t D) {
  return LaunchPlan{name("key_grad_kernel", "float const*, float const*, float const*, float const*, float*)"),
                    blocks(K, BN), 1, THREADS, 0, {(N + BM - 1) / BM, (D + BK - 1) / BK}};
}

}  // namespace

std::vector<LaunchPlan> soft_contrastive_plans(const std::string& mode, const std::string&, int64_t N, int64_t K,
                                               int64_t D) {
  // fp32 SIMT kernels: 16-bit inputs are upcast by the Python launcher, so the dtype does not change the plan.
  if (mode == "key_grad") return N == 0 || K == 0 ? std::vector<LaunchPlan>{} : std::vector<LaunchPlan>{key_grad_plan(N, K, D)};
  if (N == 0) return {};
  std::vector<LaunchPlan> plans{forward_plan(N, K, D)};
  if (mode == "forward_grad") plans.push_back(row_grad_plan(N, K, D));
  return plans;
}

void soft_contrastive_forward(RowsArg s, RowsArg t, uintptr_t k, int64_t k_sk, int64_t k_sd, ScalesArg scales, int64_t N, int64_t K,
                              int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss, uintptr_t lse_s,
                              uintptr_t lse_t, uintptr_t stream) {
  if (N == 0) return;
  const LaunchPlan p = forward_plan(N, K, D);
  AK_LAUNCH(forward_kernel, dim3(p.grid_x, p.grid_y), dim3(p.block), size_t(p.dynamic_smem), reinterpret_cast<cudaStream_t>(stream), rows_of(s),
            rows_of(t), keys_of(k, k_sk, k_sd), scales_of(scales), N, K, D, inv_tau_s, inv_tau_t, out<float>(loss), out<float>(lse_s),
            out<float>(lse_t));
  check_launch("soft_contrastive forward_kernel");
}

void soft_contrastive_row_grad(RowsArg s, RowsArg t, uintptr_t k, int64_t k_sk, int64_t k_sd, ScalesArg scales, int64_t N, int64_t K,
                               int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t lse_s, uintptr_t lse_t,
                               uintptr_t ds0, uintptr_t stream) {
  if (N == 0) return;
  const LaunchPlan p = row_grad_plan(N, K, D);
  AK_LAUNCH(row_grad_kernel, dim3(p.grid_x, p.grid_y), dim3(p.block), size_t(p.dynamic_smem), reinterpret_cast<cudaStream_t>(stream), rows_of(s),
            rows_of(t), keys_of(k, k_sk, k_sd), scales_of(scales), N, K, D, inv_tau_s, inv_tau_t, out<const float>(lse_s),
            out<const float>(lse_t), out<float>(ds0));
  check_launch("soft_contrastive row_grad_kernel");
}

void soft_contrastive_key_grad(RowsArg s, RowsArg t, uintptr_t k, int64_t k_sk, int64_t k_sd, ScalesArg scales, int64_t N, int64_t K,
                               int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss, uintptr_t lse_s,
                               uintptr_t lse_t, uintptr_t g, uintptr_t dk, uintptr_t stream) {
  if (N == 0 || K == 0) return;
  const LaunchPlan p = key_grad_plan(N, K, D);
  AK_LAUNCH(key_grad_kernel, dim3(p.grid_x, p.grid_y), dim3(p.block), size_t(p.dynamic_smem), reinterpret_cast<cudaStream_t>(stream), rows_of(s),
            rows_of(t), keys_of(k, k_sk, k_sd), scales_of(scales), N, K, D, inv_tau_s, inv_tau_t, out<const float>(loss),
            out<const float>(lse_s), out<const float>(lse_t), out<const float>(g), out<float>(dk));
  check_launch("soft_contrastive key_grad_kernel");
}

}  // namespace ak
