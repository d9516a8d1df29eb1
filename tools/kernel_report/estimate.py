"""The static time estimate of one compiled kernel launch, and its occupancy (an estimate, never a measurement).

Model (docs/kernel-report.md): each SASS instruction executes once per run of the innermost loop that holds it
(loops are found from backward branches; `trips[i]` is how many times loop i's body runs per CTA in total, loops
ordered by start address, outermost first) or once if it is in no loop; per warp, times the warps of a CTA
(warpgroup tensor instructions once per 4 warps). The work of a CTA is split into pipes, and

    time = max over pipes of  ceil(CTAs / SMs) x (work of one CTA on that pipe) / (per-SM rate x clock)

with DRAM as one more pipe (the launch's compulsory bytes over the bandwidth). Ignored: latency and imperfect
overlap between pipes (max over pipes is optimistic), caches other than perfect L2 reuse, clock changes.
Forward branches: every instruction of a loop body is counted each trip (a rarely taken branch pessimistically),
except code that a guarded forward branch skips (`branch_regions`) when either
  - the launch's model gives a rate for it (`branch_rates`, {marker opcode: rate}; launch_model) and the skipped
    code holds the marker, all in the branch's loop (e.g. "ATOMG": the top-k's append, skipped by a warp vote): it
    counts `rate` of its loop's trips. The rate comes from a simulation of the data (the top-k: topk_model), so
    such an estimate holds for data like the simulated ones;
  - or the skipped code holds a loop the plan gives 0 trips (a fallback the modelled data never take, e.g. the
    top-k's exact tie-break): the code around that loop counts 0 times, like the loop.
"""
from __future__ import annotations

import math

from tools.kernel_report import sass
from tools.kernel_report.devices import TENSOR_RATE, Device


def occupancy(dev: Device, registers: int, num_warps: int, shared_bytes: int) -> dict:
    """CTAs and warps per SM for this kernel (0 CTAs when it cannot launch, with the reason)."""
    threads = num_warps * 32
    regs_per_warp = math.ceil(registers * 32 / 256) * 256  # registers are allocated per warp in units of 256
    smem = shared_bytes + dev.smem_reserved_per_block
    limits = {"registers": dev.regs_per_sm // max(regs_per_warp * num_warps, 1),
              "shared memory": dev.smem_per_sm // smem,
              "threads": dev.max_threads_per_sm // threads, "blocks": dev.max_blocks_per_sm}
    ctas = min(limits.values())
    why = min(limits, key=limits.get)
    if shared_bytes > dev.smem_per_block:
        ctas, why = 0, f"shared memory {shared_bytes} B > {dev.smem_per_block} B per block: cannot launch"
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * num_warps, limited_by=why)


def _innermost(n: int, loop_bodies: list[list[int]]) -> list[int]:
    """Index of the innermost (smallest) loop holding each instruction, -1 for none."""
    owner, size = [-1] * n, [n + 1] * n
    for li, body in enumerate(loop_bodies):
        for i in body:
            if len(body) < size[i]:
                owner[i], size[i] = li, len(body)
    return owner


def _executions(n: int, loop_bodies: list[list[int]], trips: list[int]) -> list[int]:
    """Runs per CTA of each instruction: the trips of the innermost (smallest) loop holding it, else 1."""
    return [trips[li] if li >= 0 else 1 for li in _innermost(n, loop_bodies)]


def branch_regions(instrs: list[sass.Instr], loop_bodies: list[list[int]], trips: list[int],
                   markers) -> dict[int, tuple[str, float]]:
    """{instruction index: (why, rate)} for code that a guarded forward branch skips, where the branch and its target
    are in one innermost loop, when the skipped code
      - holds a loop given 0 trips (and otherwise only code of that loop and the branch's): rate 0, the plan says
        the path into that loop is not taken on the modelled data;
      - holds a `markers` opcode, all in the branch's loop: rate markers[opcode]."""
    owner = _innermost(len(instrs), loop_bodies)
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    zero = {li for li, t in enumerate(trips) if t == 0}
    out = {}
    for i, ins in enumerate(instrs):
        if ins.base != "BRA" or not ins.guarded or owner[i] < 0:
            continue
        target = sass.branch_target(ins)
        t = by_addr.get(target) if target is not None else None
        if t is None or t <= i + 1 or owner[t] != owner[i]:
            continue
        inner = {owner[j] for j in range(i + 1, t)}
        if inner == {owner[i]}:
            held = sorted({instrs[j].base for j in range(i + 1, t)} & set(markers))
            if held:
                out.update((j, (held[0], markers[held[0]])) for j in range(i + 1, t) if j not in out)
        elif inner - {owner[i]} <= zero and inner & zero and all(
                set(loop_bodies[li]) <= set(range(i + 1, t)) for li in inner - {owner[i]}):
            out.update((j, ("a 0-trip loop", 0.0)) for j in range(i + 1, t))
    return out


def map_trips(loop_bodies: list[list[int]], instrs: list[sass.Instr], trips: list[int]) -> tuple[list, str]:
    """Trip counts per SASS loop. The launch plan lists one per loop, outermost first; when the compiler made a
    different number of loops, loops holding tensor-core instructions get the plan's largest count and the others
    run once, and the returned note says so."""
    hot = [any(instrs[i].base in sass.TENSOR_OPS for i in body) for body in loop_bodies]
    if len(trips) == len(loop_bodies):
        note = ""
        if any(hot) and trips and not hot[trips.index(max(trips))]:
            note = "the loop given the most trips holds no tensor-core instruction: loop mapping uncertain"
        return list(trips), note
    note = (f"{len(loop_bodies)} loops in SASS against {len(trips)} trip counts in the launch plan: loops with "
            f"tensor-core instructions counted {max(trips) if trips else 1} times, the others once")
    top = max(trips) if trips else 1
    return [top if h else 1 for h in hot], note


def pipe_work(instrs: list[sass.Instr], runs: list[float], num_warps: int) -> dict:
    """Per-CTA work by pipe: lane-instructions, issue slots (warp instructions), shared bytes, tensor flops."""
    w = dict(issue=0.0, fma=0.0, alu=0.0, imad=0.0, mufu=0.0, conv=0.0, shared_bytes=0.0, tensor={})
    groups = num_warps / 4
    for ins, n in zip(instrs, runs):
        base = ins.base
        w["issue"] += n * num_warps
        lanes = 32 * n * num_warps
        if base in sass.FMA_OPS:
            w["fma"] += lanes
        elif base in sass.IMAD_OPS:
            w["imad"] += lanes
        elif base in sass.MUFU_OPS:
            w["mufu"] += lanes
        elif base in sass.CONV_OPS:
            w["conv"] += lanes
        elif base in sass.ALU_OPS:
            w["alu"] += lanes
        if base in sass.SHARED_OPS:
            w["shared_bytes"] += lanes * sass.lane_bytes(ins)
        if (mma := sass.mma_work(ins)) is not None:
            kind, flops, smem = mma
            per = groups if base.endswith("GMMA") else num_warps
            w["tensor"][kind] = w["tensor"].get(kind, 0.0) + n * per * flops
            w["shared_bytes"] += n * per * smem
    return w


def estimate(dev: Device, instrs: list[sass.Instr], trips: list[int], grid: int, num_warps: int,
             dram_bytes: float, branch_rates: dict | None = None) -> dict:
    """{"ms", "bound", "pipes_ms": {pipe: ms}, "note"} for one launch of `grid` CTAs."""
    loop_bodies = sass.loops(instrs)
    mapped, note = map_trips(loop_bodies, instrs, trips)
    runs = _executions(len(instrs), loop_bodies, mapped)
    regions = branch_regions(instrs, loop_bodies, mapped, branch_rates or {})
    for j, (_, rate) in regions.items():
        runs[j] *= rate
    for why, rate in sorted(set(regions.values())):
        n = sum(1 for r in regions.values() if r == (why, rate))
        note = "; ".join(filter(None, [note, f"{n} instructions in branch regions holding {why} counted at rate "
                                             f"{rate:.3f}"]))
    w = pipe_work(instrs, runs, num_warps)
    clk = dev.clock_ghz * 1e9
    waves = math.ceil(grid / dev.sms)
    per_sm_clocks = {
        "issue": w["issue"] / dev.issue_warps, "fma": w["fma"] / dev.fma_lanes, "alu": w["alu"] / dev.alu_lanes,
        "imad": w["imad"] / dev.imad_lanes, "mufu": w["mufu"] / dev.mufu_lanes, "conv": w["conv"] / dev.conv_lanes,
        "shared": w["shared_bytes"] / dev.shared_bytes,
        "tensor": sum(f / (dev.tensor_flops_per_clk * TENSOR_RATE[k]) for k, f in w["tensor"].items()),
    }
    pipes_ms = {p: waves * c / clk * 1e3 for p, c in per_sm_clocks.items()}
    pipes_ms["dram"] = dram_bytes / (dev.dram_tbps * 1e12) * 1e3
    bound = max(pipes_ms, key=pipes_ms.get)
    return dict(ms=pipes_ms[bound], bound=bound, pipes_ms=pipes_ms, note=note,
                tensor_flops=sum(w["tensor"].values()) * grid)


def floor_ms(dev: Device, gemm_equivalents: float, N: int, K: int, D: int) -> float:
    """GEMM-equivalents (2 N K D flops each) at the published dense 16-bit peak."""
    return gemm_equivalents * 2.0 * N * K * D / (dev.dense_16bit_tflops * 1e12) * 1e3
