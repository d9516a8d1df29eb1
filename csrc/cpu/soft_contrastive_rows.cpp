// Native CPU helper of the chunked soft-label contrastive path: the per-row softmax statistics and gradient of a
// chunk of logits, in one pass structure instead of ~14 separate torch elementwise passes.
//
// Given a = s Kᵀ/τ_s and b = t Kᵀ/τ_t for c rows (row-major, c x K, fp32), per row:
//   lse_a, lse_b, loss = Σ_j p_j ((b_j - max b) - (a_j - max a)) - log l_b + log l_a, with p = softmax(b),
//   q = softmax(a), l = Σ_j e^{x_j - max x} (the shifted form: at τ = 1e-4 the logits are ~1e4 and
//   Σ p (b - a) - lse_b + lse_a would cancel to far below their fp32 rounding);
//   with grad: a <- q - p in place (b is overwritten with e^{b - max b}).
// Three sweeps over a row (max; exponentials and sums; q - p) that stay in L2 (a row is 2 x 4 K bytes). Reductions
// keep V independent partial sums so they vectorise without -ffast-math (measured at c = 512, K = 8192 on 2 AVX2
// cores: 9.2 ms a chunk, against 15.1 ms with one accumulator and a run-time `grad` branch in the loop).
// Rows are split across threads (parallel_rows.h); each row is reduced by one thread in a fixed order: deterministic.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../launchers.h"
#include "parallel_rows.h"

// The row sweeps are compiled three times (AVX-512, AVX2 + FMA, baseline) and one is chosen once per process: the
// best the CPU has, or, with ATEN_CPU_CAPABILITY=avx2 / default (torch's own switch), at most that, so a forced-AVX2
// run (.ci/run, the benchmark) exercises the AVX2 code of this kernel too.
#if defined(__x86_64__) && defined(__GNUC__)
#define AK_ISA_DISPATCH 1
#define AK_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define AK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define AK_INLINE __attribute__((always_inline)) inline
#else
#define AK_ISA_DISPATCH 0
#define AK_INLINE inline
#endif

namespace ak {
namespace {

// e^x for x <= 0 down to -87 (smaller inputs give ~1e-38, i.e. 0 at fp32 softmax precision). Cody-Waite range
// reduction and a degree-6 polynomial: about 2 ulp, and written so the compiler vectorises the loops around it
// (no libm call, rounding by the 1.5 * 2^23 trick).
AK_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int V = 16;  // independent partial sums: lets the compiler vectorise float reductions without -ffast-math

template <bool grad>
AK_INLINE void rows_body(float* a, float* b, int64_t r0, int64_t r1, int64_t K, float* loss, float* lse_a,
                         float* lse_b) {
  const int64_t Kv = K - K % V;
  for (int64_t i = r0; i < r1; ++i) {
    float* ai = a + i * K;
    float* bi = b + i * K;
    float vma[V], vmb[V];
    for (int l = 0; l < V; ++l) { vma[l] = -INFINITY; vmb[l] = -INFINITY; }
    for (int64_t j = 0; j < Kv; j += V)
      for (int l = 0; l < V; ++l) {
        vma[l] = ai[j + l] > vma[l] ? ai[j + l] : vma[l];
        vmb[l] = bi[j + l] > vmb[l] ? bi[j + l] : vmb[l];
      }
    float ma = -INFINITY, mb = -INFINITY;
    for (int l = 0; l < V; ++l) { ma = vma[l] > ma ? vma[l] : ma; mb = vmb[l] > mb ? vmb[l] : mb; }
    for (int64_t j = Kv; j < K; ++j) { ma = ai[j] > ma ? ai[j] : ma; mb = bi[j] > mb ? bi[j] : mb; }
    float vla[V] = {}, vlb[V] = {}, vcr[V] = {};
    for (int64_t j = 0; j < Kv; j += V)
      for (int l = 0; l < V; ++l) {
        const float x = ai[j + l] - ma, y = bi[j + l] - mb;
        const float ea = exp_nonpositive(x), eb = exp_nonpositive(y);
        vla[l] += ea; vlb[l] += eb; vcr[l] += eb * (y - x);
        if (grad) { ai[j + l] = ea; bi[j + l] = eb; }
      }
    float la = 0.f, lb = 0.f, cross = 0.f;
    for (int l = 0; l < V; ++l) { la += vla[l]; lb += vlb[l]; cross += vcr[l]; }
    for (int64_t j = Kv; j < K; ++j) {
      const float x = ai[j] - ma, y = bi[j] - mb;
      const float ea = exp_nonpositive(x), eb = exp_nonpositive(y);
      la += ea; lb += eb; cross += eb * (y - x);
      if (grad) { ai[j] = ea; bi[j] = eb; }
    }
    const float lsa = ma + std::log(la), lsb = mb + std::log(lb);
    loss[i] = cross / lb - std::log(lb) + std::log(la);
    lse_a[i] = lsa;
    lse_b[i] = lsb;
    if (grad) {
      const float ra = 1.f / la, rb = 1.f / lb;
      for (int64_t j = 0; j < K; ++j) ai[j] = ai[j] * ra - bi[j] * rb;
    }
  }
}

using RowsFn = void (*)(float*, float*, int64_t, int64_t, int64_t, float*, float*, float*);

template <bool grad>
void rows_baseline(float* a, float* b, int64_t r0, int64_t r1, int64_t K, float* loss, float* la, float* lb) {
  rows_body<grad>(a, b, r0, r1, K, loss, la, lb);
}
#if AK_ISA_DISPATCH
template <bool grad>
AK_TARGET_AVX2 void rows_avx2(float* a, float* b, int64_t r0, int64_t r1, int64_t K, float* loss, float* la,
                              float* lb) {
  rows_body<grad>(a, b, r0, r1, K, loss, la, lb);
}
template <bool grad>
AK_TARGET_AVX512 void rows_avx512(float* a, float* b, int64_t r0, int64_t r1, int64_t K, float* loss, float* la,
                                  float* lb) {
  rows_body<grad>(a, b, r0, r1, K, loss, la, lb);
}
#endif

// "avx512", "avx2" or "default": the best of the CPU's, capped by ATEN_CPU_CAPABILITY (as torch reads it)
std::string isa_choice() {
  std::string best = "default";
#if AK_ISA_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = "avx2";
  if (best == "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) best = "avx512";
#endif
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string want = cap ? cap : "";
  if (want == "default") return "default";
  if (want == "avx2" && best == "avx512") return "avx2";
  return best;
}

const std::string& isa() {
  static const std::string chosen = isa_choice();
  return chosen;
}

RowsFn pick(bool grad) {
#if AK_ISA_DISPATCH
  if (isa() == "avx512") return grad ? rows_avx512<true> : rows_avx512<false>;
  if (isa() == "avx2") return grad ? rows_avx2<true> : rows_avx2<false>;
#endif
  return grad ? rows_baseline<true> : rows_baseline<false>;
}

void rows_range(float* a, float* b, int64_t r0, int64_t r1, int64_t K, float* loss, float* lse_a, float* lse_b,
                bool grad) {
  pick(grad)(a, b, r0, r1, K, loss, lse_a, lse_b);
}
}  // namespace

std::string cpu_rows_isa() { return isa(); }

void soft_contrastive_rows_cpu(uintptr_t a, uintptr_t b, int64_t rows, int64_t K, uintptr_t loss, uintptr_t lse_a,
                               uintptr_t lse_b, bool grad, int threads) {
  // Buffer sizes were checked by the Python caller (action_kernels._extension.check_buffers); these are the checks
  // a raw-pointer entry point can make itself. std::invalid_argument reaches Python as ValueError.
  if (rows < 0 || K < 1)
    throw std::invalid_argument("soft_contrastive_rows_cpu: expected rows >= 0 and K >= 1, got rows=" +
                                std::to_string(rows) + ", K=" + std::to_string(K));
  if (rows > 0 && (a == 0 || b == 0 || loss == 0 || lse_a == 0 || lse_b == 0))
    throw std::invalid_argument("soft_contrastive_rows_cpu: a null buffer pointer");
  auto* pa = reinterpret_cast<float*>(a);
  auto* pb = reinterpret_cast<float*>(b);
  auto* pl = reinterpret_cast<float*>(loss);
  auto* pla = reinterpret_cast<float*>(lse_a);
  auto* plb = reinterpret_cast<float*>(lse_b);
  parallel_rows(rows, threads, [&](int64_t r0, int64_t r1) { rows_range(pa, pb, r0, r1, K, pl, pla, plb, grad); });
}

}  // namespace ak
