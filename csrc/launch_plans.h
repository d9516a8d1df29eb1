// Launch plans: the one place where every kernel launch's configuration is decided. The CUDA launchers
// (csrc/*.cu) launch exactly what these functions return, and the static kernel report reads the same plans
// through the bindings (`launch_plans` in _C and _C_cpu), so no second copy of a tiling decision exists.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ak {

struct LaunchPlan {
  std::string kernel;          // the kernel's cubin symbol, demangled (as c++filt / cu++filt print it)
  unsigned grid_x = 1;         // CTAs along x
  unsigned grid_y = 1;         // CTAs along y (grid = grid_x * grid_y)
  unsigned block = 0;          // threads per CTA
  int64_t dynamic_smem = 0;    // bytes of dynamic shared memory
  std::vector<int64_t> trips;  // trip counts of the kernel's loops per CTA, outermost first
};

// op: "soft_contrastive" (mode "forward", "forward_grad" or "key_grad") or "hard_negative_topk" (mode "topk");
// dtype: "bf16", "fp16" or "fp32" (the inputs' dtype); N rows, K keys, D features, k selected per row (top-k).
// One plan per kernel launch, in launch order. Throws std::invalid_argument naming a bad argument.
std::vector<LaunchPlan> launch_plans(const std::string& op, const std::string& mode, const std::string& dtype,
                                     int64_t N, int64_t K, int64_t D, int64_t k);

// Per-op halves of launch_plans, defined next to their kernels (arguments already validated).
std::vector<LaunchPlan> soft_contrastive_plans(const std::string& mode, const std::string& dtype, int64_t N,
                                               int64_t K, int64_t D);
std::vector<LaunchPlan> hard_negative_topk_plans(const std::string& dtype, int64_t N, int64_t K, int64_t D,
                                                 int64_t k);

}  // namespace ak
