"""What the static estimate needs of one captured Triton launch, derived here from the launch itself.

The launchers record only what they run (kernel, grid, arguments, constexprs, warps, stages: `_common.Launch`);
everything the estimate adds comes from this module, so the library imports nothing of the report:
  trips         loop trip counts per program, outermost first (estimate.map_trips matches them to the SASS loops)
  dram_bytes    the bytes a launch must move from DRAM (the estimate's memory floor)
  branch_rates  {marker opcode: rate}: forward-branch regions holding the marker run this fraction of their loop's
                trips (estimate.branch_regions); from a simulation of the data, never a guess
  notes         extra numbers the JSON keeps for a reader (the top-k scan's simulated prunes)
"""
from __future__ import annotations

import dataclasses

from tools.kernel_report.topk_model import simulate


@dataclasses.dataclass
class LaunchModel:
    trips: list
    dram_bytes: float
    branch_rates: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)


def _tensor_bytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def model(launch) -> LaunchModel:
    """The LaunchModel of a launch captured by `action_kernels.triton._common.capture` (meta tensors are fine)."""
    a, c = launch.args, launch.constexprs
    if launch.op == "soft_contrastive":
        tensors = [v for v in a.values() if hasattr(v, "element_size")]
        if launch.name in ("forward", "row_grad"):  # one program per row block streams every key tile
            return LaunchModel(trips=[a["K"] // c["BLOCK_N"]], dram_bytes=_tensor_bytes(*tensors))
        if launch.name == "key_grad":  # one program per key block streams every row tile
            return LaunchModel(trips=[a["N"] // c["BLOCK_M"]], dram_bytes=_tensor_bytes(*tensors))
    if launch.op == "hard_negative_topk":
        if launch.name == "topk_scan":
            bm, bn, W = c["BLOCK_M"], c["BLOCK_N"], c["W"]
            sim = simulate(a["K"], a["k_out"], bm, bn, W)
            merges = sim["merges"]
            # loops, outermost first: the prune loop (merges + 1 runs), the scan (every tile, reruns included), the
            # prune's row steps, the exact select's 64 bit steps (a fallback, not run on data without massive ties);
            # the append's warp rate weighs its branch
            return LaunchModel(trips=[merges + 1, sim["tiles"], merges * (bm // c["MERGE_ROWS"]), 0],
                               dram_bytes=_tensor_bytes(a["A"], a["Kp"]),
                               branch_rates={"ATOMG": sim["append_rate"]}, notes=dict(merges=merges))
        if launch.name == "topk_select":  # values and indices out (12 B an entry), every row's slots in
            return LaunchModel(trips=[], dram_bytes=float(a["Values"].numel() * 12 + a["N"] * c["W"] * 8))
    raise ValueError(f"no launch model for the {launch.op} kernel {launch.name!r}: add one to "
                     f"tools/kernel_report/launch_model.py")
