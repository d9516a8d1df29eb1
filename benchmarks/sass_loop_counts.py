"""Static estimate of the CUDA kernels from their SASS, without a GPU (an estimate, not a measurement).

Compiles csrc/*.cu to sm_90 cubins with nvcc (the flags of setup.py), reads each planned kernel's SASS with the
cuobjdump of the triton wheel, finds its loops (backward branches), and counts the instructions of the main loop
(the outermost loop holding the most HMMA / FFMA) and of its hottest inner loop. With the launch plans of
`action_kernels._C_cpu.launch_plans` (grid, block, trips) it bounds the time on an H200 by:
  tensor  mma FLOPs at the dense bf16 peak (790 TFLOP/s measured there; tf32 m16n8k8 counts as half the FLOPs of
          a bf16 m16n8k16 at half the rate, so both weigh 4096 bf16-FLOPs per instruction);
  fp32    FFMA at 132 SMs x 128 lanes x 1.98 GHz;
  issue   warp-instructions at 4 per SM per clock;
  smem    LDS / LDSM bytes at 128 bytes per SM per clock;
  mufu    MUFU at 16 per SM per clock;
and reports the largest (perfect overlap) and the floor (2 N K D FLOPs per GEMM at 790 TFLOP/s). Loops inside the
main loop other than the hottest count once per main-loop trip, so the counts are lower bounds for those.
This is what the issue-13 kernel report replaces once it lands; until then it is how the CUDA numbers in
docs/cuda_kernels.md were produced:

    python benchmarks/sass_loop_counts.py --op soft_contrastive --mode forward_grad --dtype bf16 -N 65536 -K 65536 -D 128
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
            width = re.search(r"\.(64|128)", op)
            c["smem_bytes"] += 32 * (int(width.group(1)) // 8 if width else 4)
        elif base == "LDSM":
            n = re.search(r"\.MT?88\.(\d)", op)
            c["smem_bytes"] += 128 * (int(n.group(1)) if n else 1)
    return c


def estimate(plan, instrs):
    """(hot-loop counts, enclosing-loop counts or None, time bounds in s).

    The hot loop is the innermost loop holding the most HMMA (else FFMA). With two plan trips and an enclosing
    loop, the hot loop runs trips[0] * trips[1] times and the rest of the enclosing loop trips[0] times; with one,
    the hot loop runs trips[0] times and the enclosing loop's own code (a rare path: the top-k compaction) is
    reported but not counted.
    """
    lps = loops(instrs)
    score = lambda lp: (lambda c: c["HMMA"] * 100 + c["FFMA"])(counts(instrs, *lp))  # noqa: E731
    if not lps:
        return None
    top = max(score(lp) for lp in lps)
    hot = min((lp for lp in lps if score(lp) == top), key=lambda lp: lp[1] - lp[0])
    outer = [lp for lp in lps if lp[0] <= hot[0] and hot[1] <= lp[1] and lp != hot]
    enclosing = min(outer, key=lambda lp: lp[1] - lp[0]) if outer else None
    trips, warps = plan["trips"], plan["grid"] * plan["block"] // 32
    hc = counts(instrs, *hot)
    if enclosing is not None and len(trips) > 1:
        ec = counts(instrs, *enclosing)
        tot = {k: hc[k] * trips[0] * trips[1] + (ec[k] - hc[k]) * trips[0] for k in hc}
    else:
        ec = counts(instrs, *enclosing) if enclosing is not None else None
        tot = {k: v * trips[0] for k, v in hc.items()}
    tot = {k: v * warps for k, v in tot.items()}
    t = {
        "tensor": tot["HMMA"] * 4096 / PEAK_BF16,
        "fp32": tot["FFMA"] * 32 / (SMS * 128 * CLOCK),
        "issue": tot["total"] / (4 * SMS * CLOCK),
        "smem": tot["smem_bytes"] / (128 * SMS * CLOCK),
        "mufu": tot["MUFU"] * 32 / (16 * SMS * CLOCK),
    }
    return hc, ec, t


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
        whole, hot, t = estimate(plan, instrs)  # hot loop, enclosing loop
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
