// Host code only: argument checks of launch_plans (csrc/launch_plans.h) and the dispatch to each op's plans, and
// the streaming predicate the launchers' callers use.
#include <stdexcept>

#include "launch_plans.h"
#include "launchers.h"
#include "tc_tiles.cuh"

namespace ak {
namespace {

void expect_one_of(const char* name, const std::string& got, std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (got == a) return;
    list += std::string(list.empty() ? "" : ", ") + "'" + a + "'";
  }
  throw std::invalid_argument(std::string("launch_plans: ") + name + " must be one of " + list + ", got '" + got +
                              "'");
}

void expect_size(const char* name, int64_t v, int64_t lo) {
  if (v < lo)
    throw std::invalid_argument(std::string("launch_plans: ") + name + " must be >= " + std::to_string(lo) +
                                ", got " + std::to_string(v));
}

}  // namespace

std::vector<LaunchPlan> launch_plans(const std::string& op, const std::string& mode, const std::string& dtype,
                                     int64_t N, int64_t K, int64_t D, int64_t k) {
  expect_one_of("op", op, {"soft_contrastive", "hard_negative_topk"});
  expect_one_of("dtype", dtype, {"bf16", "fp16", "fp32"});
  expect_size("N", N, 0);
  expect_size("K", K, 0);
  expect_size("D", D, 1);
  if (op == "soft_contrastive") {
    expect_one_of("mode (for op 'soft_contrastive')", mode, {"forward", "forward_grad", "key_grad"});
    return soft_contrastive_plans(mode, dtype, N, K, D);
  }
  expect_one_of("mode (for op 'hard_negative_topk')", mode, {"topk"});
  expect_size("k", k, 1);
  return hard_negative_topk_plans(dtype, N, K, D, k);
}

bool uniform_rows(RowsArg rows, int64_t nrows, const std::string& dtype) {
  return src_of(rows, nrows, dtype == "fp32" ? 4 : 2).uniform;
}

}  // namespace ak
