// Host launchers of the kernels in csrc/*.cu. Raw device pointers (as integers), sizes, strides (in elements) and
// the stream handle; the caller (Python) allocates every output and selects the device. No torch types.
#pragma once

#include <cstdint>

namespace ak {

struct RowsArg {
  uintptr_t ptr;
  int64_t P, sb, sp, sd;
};

const char* flavour();

// loss, lse_s, lse_t: (N,) fp32. s, t: (B, P, D) fp32 views; k: (K, D) fp32 with strides k_sk, k_sd.
void soft_contrastive_forward(RowsArg s, RowsArg t, uintptr_t k, int64_t k_sk, int64_t k_sd, int64_t N, int64_t K,
                              int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss, uintptr_t lse_s,
                              uintptr_t lse_t, uintptr_t stream);

// ds0: (N, D) fp32, zero-filled by the caller; ds0_i = (q_i - p_i) K / tau_s.
void soft_contrastive_row_grad(RowsArg s, RowsArg t, uintptr_t k, int64_t k_sk, int64_t k_sd, int64_t N, int64_t K,
                               int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t lse_s, uintptr_t lse_t,
                               uintptr_t ds0, uintptr_t stream);

// dk: (K, D) fp32, zero-filled by the caller; g: (N,) fp32 upstream per-row gradient.
void soft_contrastive_key_grad(RowsArg s, RowsArg t, uintptr_t k, int64_t k_sk, int64_t k_sd, int64_t N, int64_t K,
                               int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss, uintptr_t lse_s,
                               uintptr_t lse_t, uintptr_t g, uintptr_t dk, uintptr_t stream);

}  // namespace ak
