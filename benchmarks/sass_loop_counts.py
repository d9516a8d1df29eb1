"""Static estimate of the CUDA kernels from their SASS, without a GPU (an estimate, not a measurement).

Compiles csrc/*.cu to sm_90 cubins with nvcc (the flags of setup.py), reads each planned kernel's SASS with the
cuobjdump of the triton wheel, finds its loops (backward branches), and counts the instructions of the main loop
(the innermost loop holding the most HMMA / FFMA), and weighs every instruction by the trips of the loops around
it. With the launch plans of `action_kernels._C_cpu.launch_plans` (grid, block, trips) it bounds the time on an
H200 by:
  tensor  mma FLOPs at the dense bf16 peak (790 TFLOP/s measured there; tf32 m16n8k8 counts as half the FLOPs of
          a bf16 m16n8k16 at half the rate, so both weigh 4096 bf16-FLOPs per instruction);
  fp32    FFMA at 132 SMs x 128 lanes x 1.98 GHz;
  issue   warp-instructions at 4 per SM per clock;
  smem    shared-memory wavefronts (128 bytes per SM per clock): LDSM .xN = N, a plain LDS = 1 (conflict-free
          or broadcast, as the kernels' are);
  mufu    MUFU at 16 per SM per clock;
and reports the largest (perfect overlap) and the floor (2 N K D FLOPs per GEMM at 790 TFLOP/s). Loops the plan's
trips do not name count once per pass unless --trip gives them a count, so such counts are lower bounds.
This is what the issue-13 kernel report replaces once it lands; until then it is how the CUDA numbers in
docs/cuda_kernels.md were produced:

    python benchmarks/sass_loop_counts.py --op soft_contrastive --mode forward_grad --dtype bf16 \
        -N 65536 -K 65536 -D 128
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMS, CLOCK, PEAK_BF16 = 132, 1.98e9, 790e12


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_cubins(out: str, arch: str = "90") -> list[str]:
    cubins = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))):
        cubin = os.path.join(out, os.path.basename(src) + ".cubin")
        subprocess.run(["nvcc", "-O3", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), f"-arch=sm_{arch}", "-cubin",
                        src, "-o", cubin], check=True)
        cubins.append(cubin)
    return cubins


def sass_functions(cubins: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    """{demangled name: [(address, opcode, full line)]}."""
    funcs: dict[str, list] = {}
    for cubin in cubins:
        text = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        name = None
        for line in text.splitlines():
            m = re.search(r"Function : (\S+)", line)
            if m:
                name = subprocess.run(["c++filt"], input=m.group(1), capture_output=True, text=True).stdout.strip()
                funcs[name] = []
                continue
            m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if m and name:
                funcs[name].append((int(m.group(1), 16), m.group(2), line))
    return funcs


def loops(instrs):
    out = []
    for addr, op, line in instrs:
        if op.startswith("BRA"):
            m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", line)
            if m and int(m.group(1), 16) < addr:
                out.append((int(m.group(1), 16), addr))
    return out


def counts(instrs, lo, hi):
    c = {"total": 0, "HMMA": 0, "FFMA": 0, "MUFU": 0, "smem_bytes": 0, "BAR": 0, "SHFL": 0}
    for addr, op, _ in instrs:
        if not lo <= addr <= hi:
            continue
        c["total"] += 1
        base = op.split(".")[0]
        if base in c:
            c[base] += 1
        if base == "LDS":
            # one 128-byte wavefront: the kernels' plain shared loads are conflict-free or broadcasts (lanes with the
            # same column share an address), so a wider load is still one wavefront
            c["smem_bytes"] += 128
        elif base == "LDSM":
            n = re.search(r"\.MT?88\.(\d)", op)
            c["smem_bytes"] += 128 * (int(n.group(1)) if n else 1)
    return c


def estimate(plan, instrs, overrides=None):
    """(hot-loop counts, enclosing-loop counts or None, time bounds in s).

    Every instruction counts once per execution of the loops around it: the plan's trips go, outermost first, to
    the chain of loops around the hot loop (the innermost loop holding the most HMMA, else FFMA); `overrides`
    ({loop start address: trips}) gives other loops theirs; a loop with neither counts once per pass of its
    enclosing loop (a lower bound: e.g. the top-k compaction, which runs for a data-dependent few tiles).
    """
    lps = loops(instrs)
    if not lps:
        return None
    key = "HMMA" if any(counts(instrs, *lp)["HMMA"] for lp in lps) else "FFMA"
    score = lambda lp: counts(instrs, *lp)[key]  # noqa: E731
    # the nest of the work: the largest loop with the most HMMA (FFMA), then inside it, level by level, the child
    # loop with the most; the plan's trips go down this chain
    top = max(score(lp) for lp in lps)
    chain = [max((lp for lp in lps if score(lp) == top), key=lambda lp: lp[1] - lp[0])]
    while True:
        inner = [lp for lp in lps if chain[-1][0] <= lp[0] and lp[1] <= chain[-1][1] and lp != chain[-1]]
        children = [lp for lp in inner if not any(o[0] <= lp[0] and lp[1] <= o[1] and o != lp for o in inner)]
        children = [lp for lp in children if score(lp) > 0]
        if not children:
            break
        chain.append(max(children, key=score))
    hot = chain[-1]
    around = [lp for lp in lps if lp[0] <= chain[0][0] and chain[0][1] <= lp[1]]  # the work loop and its parents
    chain = sorted(around, key=lambda lp: lp[0] - lp[1])[:-1] + chain
    trips = {lp: t for lp, t in zip(chain, plan["trips"])}
    for lp in lps:
        if overrides and lp[0] in overrides:
            trips[lp] = overrides[lp[0]]
    outer = [lp for lp in lps if lp[0] <= hot[0] and hot[1] <= lp[1] and lp != hot]
    enclosing = min(outer, key=lambda lp: lp[1] - lp[0]) if outer else None
    tot = dict.fromkeys(counts(instrs, 0, -1), 0)
    for addr, op, line in instrs:
        mult = 1
        inside = False
        for lp in lps:
            if lp[0] <= addr <= lp[1]:
                inside = True
                mult *= trips.get(lp, 1)
        if not inside:
            continue
        for k, v in counts([(addr, op, line)], addr, addr).items():
            tot[k] += v * mult
    warps = plan["grid"] * plan["block"] // 32
    tot = {k: v * warps for k, v in tot.items()}
    t = {
        "tensor": tot["HMMA"] * 4096 / PEAK_BF16,
        "fp32": tot["FFMA"] * 32 / (SMS * 128 * CLOCK),
        "issue": tot["total"] / (4 * SMS * CLOCK),
        "smem": tot["smem_bytes"] / (128 * SMS * CLOCK),
        "mufu": tot["MUFU"] * 32 / (16 * SMS * CLOCK),
    }
    return counts(instrs, *hot), (counts(instrs, *enclosing) if enclosing else None), t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", default="soft_contrastive")
    ap.add_argument("--mode", default="forward_grad")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("-N", type=int, default=65536)
    ap.add_argument("-K", type=int, default=65536)
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("-k", type=int, default=64)
    ap.add_argument("--cubins", nargs="*", help="existing sm_90 cubins (default: compile csrc/*.cu)")
    ap.add_argument("--loops", action="store_true", help="also list every loop of each kernel (address range, "
                                                          "instructions, FFMA, HMMA, MUFU, smem bytes)")
    ap.add_argument("--trip", action="append", default=[], metavar="KERNEL_SUBSTRING:ADDR=N",
                    help="trip count N for the loop starting at hex ADDR (see --loops) of the kernels whose name "
                         "contains KERNEL_SUBSTRING, for loops the plan's trips do not name")
    ap.add_argument("--host-module", help="the _C_cpu .so whose launch_plans to use (default: the installed one), "
                                          "e.g. one built from an older commit, with that commit's cubins")
    args = ap.parse_args()
    if args.host_module:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_C_cpu", args.host_module)
        _C_cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_C_cpu)
    else:
        from action_kernels import _C_cpu

    plans = _C_cpu.launch_plans(args.op, args.mode, args.dtype, args.N, args.K, args.D, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        funcs = sass_functions(args.cubins or compile_cubins(tmp))
    total = 0.0
    for plan in plans:
        instrs = funcs.get(plan["kernel"])
        if instrs is None:
            raise SystemExit(f"{plan['kernel']} is not in the cubins")
        overrides = {}
        for spec in args.trip:
            who, rest = spec.split(":", 1)
            addr, n = rest.split("=")
            if who in plan["kernel"]:
                overrides[int(addr, 16)] = int(n)
        whole, hot, t = estimate(plan, instrs, overrides)  # hot loop, enclosing loop
        bound = max(t, key=t.get)
        total += t[bound]
        print(f"{plan['kernel']}\n  grid {plan['grid']} x {plan['block']} threads, smem {plan['dynamic_smem']} B, "
              f"trips {plan['trips']}")
        print(f"  hot loop: {whole['total']} instr, HMMA {whole['HMMA']}, FFMA {whole['FFMA']}, MUFU {whole['MUFU']}, "
              f"SHFL {whole['SHFL']}, BAR {whole['BAR']}, smem {whole['smem_bytes']} B per warp-iteration"
              + (f"; enclosing loop {hot['total']} instr, HMMA {hot['HMMA']}, FFMA {hot['FFMA']}" if hot else ""))
        print("  estimate (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()) + f" -> {bound}-bound")
        if args.loops:
            for lo, hi in sorted(loops(instrs)):
                c = counts(instrs, lo, hi)
                print(f"    loop {lo:#07x}-{hi:#07x}: {c['total']:5d} instr, HMMA {c['HMMA']:4d}, FFMA {c['FFMA']:4d}, "
                      f"MUFU {c['MUFU']:3d}, smem {c['smem_bytes']} B")
    gemm = 2 * args.N * args.K * args.D / PEAK_BF16
    print(f"total estimate {total * 1e3:.2f} ms; one GEMM at the dense peak {gemm * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
