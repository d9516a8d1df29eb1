"""The CUDA kernels of csrc/: one cubin per .cu and architecture (the flags of setup.py), read like the Triton ones.

Launch plans (for occupancy and the static estimate) come from the host build when it exposes
`action_kernels._C_cpu.launch_plans(op, mode, dtype, N, K, D, k) -> list[dict]`, each dict
{"kernel": exact demangled cubin symbol, "grid": CTAs, "block": threads per CTA, "dynamic_smem": bytes,
 "trips": [loop trip counts per CTA, outermost first]} (the launchers take their decisions from the same function).
Without it the kernels are listed without an estimate.
"""
from __future__ import annotations

import glob
import os
import subprocess

from tools.kernel_report import estimate, tools
from tools.kernel_report.devices import device

NVCC_FLAGS = ["-O3", "-std=c++17"]   # as setup.py's _build_cuda, plus -I csrc -arch=sm_XX -cubin
NO_PLAN = "no launch plan exposed by the extension (action_kernels._C_cpu.launch_plans)"


def demangle(names: list[str]) -> dict[str, str]:
    tool, _ = tools.demangler()
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """The demangled name without its parameter list (what the known-limits file matches)."""
    depth = 0
    for i, ch in enumerate(demangled):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not demangled[i:].startswith("(anonymous namespace)"):
            return demangled[:i]
    return demangled


def launch_plans_fn():
    from action_kernels import cuda
    mod = cuda.host_module()
    return getattr(mod, "launch_plans", None) if mod is not None else None


def _entry_op(e):
    return ("hard_negative_topk", "topk") if e.op == "anatomical" else (e.op, e.mode)


def _compulsory_bytes(e) -> float:
    # the CUDA kernels read fp32 (16-bit inputs are upcast by the launcher): rows, keys, per-row outputs
    rows = 2 if e.op == "soft_contrastive" else 1
    out_row = e.D if e.mode == "forward_grad" else (e.k * 3 if e.mode == "topk" else 3)
    return 4.0 * (rows * e.N * e.D + e.K * e.D + e.N * out_row + (e.K * e.D if e.mode == "key_grad" else 0))


def section(entries, archs, out_dir, cubin_numbers) -> dict:
    for finder in (tools.nvcc, tools.csrc_dir, tools.cuobjdump):
        path, why = finder()
        if path is None:
            return dict(kernels=[], rows=[], skipped=why)
    nvcc, csrc, cuobjdump = tools.nvcc()[0], tools.csrc_dir()[0], tools.cuobjdump()[0]
    os.makedirs(out_dir, exist_ok=True)
    kernels = []
    for arch in archs:
        for cu in sorted(glob.glob(os.path.join(csrc, "*.cu"))):
            cubin = os.path.join(out_dir, f"{os.path.basename(cu)[:-3]}_sm{arch}.cubin")
            cmd = [nvcc, *NVCC_FLAGS, "-I", csrc, f"-arch=sm_{arch}", "-cubin", "-o", cubin, cu]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                kernels.append(dict(arch=arch, source=os.path.basename(cu), error=done.stderr.strip()[-500:]))
                continue
            nums = cubin_numbers(cuobjdump, cubin)
            names = demangle(list(nums))
            for sym, n in nums.items():
                kernels.append(dict({k: v for k, v in n.items()}, arch=arch, source=os.path.basename(cu),
                                    symbol=sym, name=names[sym], short_name=short_name(names[sym]), cubin=cubin))
    rows = []
    plans_fn = launch_plans_fn()
    for arch in archs:
        dev = device(arch)
        by_name = {k["name"]: k for k in kernels if k.get("arch") == arch and "name" in k}
        for e in entries:
            op, mode = _entry_op(e)
            row = dict(arch=arch, op=e.op, mode=e.mode, dtype=e.dtype, D=e.D, N=e.N, K=e.K, k=e.k,
                       floor_ms=estimate.floor_ms(dev, e.gemms, e.N, e.K, e.D), kernels=[], estimate_ms=None)
            if plans_fn is None:
                row["note"] = NO_PLAN
                rows.append(row)
                continue
            total, ok = 0.0, True
            for plan in plans_fn(op, mode, e.dtype, e.N, e.K, e.D, e.k):
                k = by_name.get(plan["kernel"])
                item = dict(kernel=plan["kernel"], grid=int(plan["grid"]), block=int(plan["block"]),
                            dynamic_smem=int(plan.get("dynamic_smem", 0)), trips=list(plan.get("trips", [])))
                if k is None:
                    item["error"], ok = "no kernel of that demangled name in the cubins", False
                else:
                    warps = item["block"] // 32
                    item["occupancy"] = estimate.occupancy(dev, k["registers"], warps,
                                                           k["static_shared"] + item["dynamic_smem"])
                    est = estimate.estimate(dev, k["_instrs"], item["trips"], item["grid"], warps,
                                            _compulsory_bytes(e) / max(1, len(plans_fn(op, mode, e.dtype, e.N, e.K,
                                                                                       e.D, e.k))))
                    item.update(estimate_ms=est["ms"], bound=est["bound"], pipes_ms=est["pipes_ms"])
                    total += est["ms"]
                row["kernels"].append(item)
            row["estimate_ms"] = total if ok else None
            row["ratio"] = total / row["floor_ms"] if ok else None
            rows.append(row)
    for k in kernels:
        k.pop("_instrs", None)
    return dict(kernels=kernels, rows=rows, skipped="", launch_plans=plans_fn is not None)
