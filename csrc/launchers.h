// Host launchers of the kernels in csrc/*.cu. Raw device pointers (as integers), sizes, strides (in elements) and
// the stream handle; the caller (Python) allocates every output and selects the device. No torch types.
#pragma once

#include <cstdint>
#include <string>

namespace ak {

struct RowsArg {
  uintptr_t ptr;
  int64_t P, sb, sp, sd;
};

// Inverse norms (fp32): rs, rt (N,) for the student and teacher rows, rk (K,) for the keys; ones to not normalise.
struct ScalesArg {
  uintptr_t rs, rt, rk;
};

const char* flavour();

// dtype: "bf16", "fp16" or "fp32", the dtype of every row and key tensor (read natively, no copies).
// s, t: (B, P, D) views of N = B P rows; k: keys as a one-batch view (ptr, P >= K, 0, k_sk, k_sd).
// loss, lse_s, lse_t, pivot_r: (N,) fp32 outputs, pivot: (N,) int32 (the row's largest teacher logit's key).
// Throws std::invalid_argument for D > 512 or K >= 2^31.
void soft_contrastive_forward(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg scales, int64_t N,
                              int64_t K, int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss, uintptr_t lse_s,
                              uintptr_t lse_t, uintptr_t pivot, uintptr_t pivot_r, uintptr_t stream);

// ds0: (N, D) fp32 out, every element written; ds0_i = (q_i - p_i) K̂ / tau_s (gradient w.r.t. the normalised row).
void soft_contrastive_row_grad(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg scales,
                               int64_t N, int64_t K, int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t lse_s,
                               uintptr_t lse_t, uintptr_t ds0, uintptr_t stream);

// dk: (K, D) fp32 out, every element written: the gradient w.r.t. the normalised keys; g: (N,) upstream gradient.
void soft_contrastive_key_grad(const std::string& dtype, RowsArg s, RowsArg t, RowsArg k, ScalesArg scales,
                               int64_t N, int64_t K, int64_t D, float inv_tau_s, float inv_tau_t, uintptr_t loss,
                               uintptr_t lse_s, uintptr_t lse_t, uintptr_t pivot, uintptr_t pivot_r, uintptr_t g,
                               uintptr_t dk, uintptr_t stream);

// values (N, topk) fp32, indices (N, topk) int64 out (padded -inf / -1). a: (B, P, D) view; k: keys as a one-batch
// view; ra (N,), rk (K,) fp32 inverse norms; ya (N,), yk (K,) int64 labels.
void hard_negative_topk(const std::string& dtype, RowsArg a, RowsArg k, uintptr_t ra, uintptr_t rk, uintptr_t ya,
                        uintptr_t yk, int64_t ignore_label, int64_t N, int64_t K, int64_t D, int64_t topk,
                        uintptr_t values, uintptr_t indices, uintptr_t stream);

// Whether a (B, P, D) view of nrows rows of `dtype` streams with cp.async (csrc/tc_tiles.cuh src_of): the operands
// a kernel streams in its main loop must.
bool uniform_rows(RowsArg rows, int64_t nrows, const std::string& dtype);

// Host build only (csrc/cpu): per-row softmax statistics of a chunk of logits for the chunked CPU path.
// a, b: (rows, K) fp32 contiguous, already divided by their temperatures; loss, lse_a, lse_b: (rows,) fp32.
// With grad, a becomes q - p (softmax(a) - softmax(b)) and b is overwritten.
void soft_contrastive_rows_cpu(uintptr_t a, uintptr_t b, int64_t rows, int64_t K, uintptr_t loss, uintptr_t lse_a,
                               uintptr_t lse_b, bool grad, int threads);
// The instruction set those row sweeps run with: "avx512", "avx2" or "default" (capped by ATEN_CPU_CAPABILITY).
std::string cpu_rows_isa();

// Host build only (csrc/cpu): top-k selection over a block of similarities for the chunked hard-negative path.
// sim: (rows, K) fp32 contiguous; row_labels (rows,), key_labels (K,) int64; values (rows, k) fp32 and indices
// (rows, k) int64 out, padded with -inf / -1.
void hard_negative_topk_rows_cpu(uintptr_t sim, int64_t rows, int64_t K, uintptr_t row_labels, uintptr_t key_labels,
                                 int64_t ignore_label, int64_t k, uintptr_t values, uintptr_t indices, int threads);

// Primitive self-tests (csrc/selftest.cu, one warp each; tests/test_cuda_primitives.py; bound in the emulation/test
// module _C_cpu only, never in _C): registers and results are lane-major arrays (lane l's registers at [l * count, (l + 1) * count)).
void selftest_mma(int type, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t stream);
void selftest_ldmatrix(uintptr_t image, int elems, uintptr_t offsets, int num, bool trans, uintptr_t out,
                       uintptr_t stream);
void selftest_shfl(int mode, int width, uintptr_t values, uintptr_t args, uintptr_t out32, uintptr_t out64,
                   uintptr_t stream);
void selftest_vote(uintptr_t pred, uintptr_t ballot, uintptr_t any, uintptr_t all, uintptr_t stream);
void selftest_cp_async(uintptr_t src, uintptr_t src_bytes, uintptr_t early, uintptr_t landed, uintptr_t stream);
void selftest_convert(uintptr_t x, int n, uintptr_t bf16, uintptr_t f16, uintptr_t tf32, uintptr_t exp2,
                      uintptr_t stream);
void selftest_broken(int which, uintptr_t out, uintptr_t stream);

}  // namespace ak
