"""Building the report: capture and compile the Triton launches, compile the CUDA sources, read every cubin."""
from __future__ import annotations

import collections

from tools.kernel_report import cuda_aot, estimate, launch_model, matrix, sass, tools, triton_aot
from tools.kernel_report.devices import device

TENSOR_KEYS = ("HGMMA", "HMMA", "IGMMA", "IMMA")


def cubin_numbers(cuobjdump: str, cubin: str, symbol: str | None = None) -> dict[str, dict]:
    """{symbol: numbers} for the kernels of one cubin (only `symbol` when given)."""
    usage = sass.resource_usage(cuobjdump, cubin)
    code = sass.disassemble(cuobjdump, cubin)
    out = {}
    for name, instrs in code.items():
        if symbol is not None and name != symbol:
            continue
        ops = collections.Counter(i.base for i in instrs)
        res = usage.get(name, {})
        out[name] = dict(res, ldl=ops["LDL"], stl=ops["STL"], ffma=ops["FFMA"], mufu=ops["MUFU"],
                         tensor={k: ops[k] for k in TENSOR_KEYS if ops[k]},
                         tensor_instructions=sum(ops[k] for k in TENSOR_KEYS), sass_instructions=len(instrs),
                         loops=len(sass.loops(instrs)), _instrs=instrs)
    return out


def _launch_summary(launch, lm: launch_model.LaunchModel) -> dict:
    tiles = ("KP", "W", "MERGE_ROWS", "RELOAD")
    cfg = {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK") or k in tiles}
    return dict(kernel=launch.name, dot=launch.dot, grid=int(launch.grid[0]), num_warps=launch.num_warps,
                num_stages=launch.num_stages, tiles=cfg, trips=list(lm.trips), dram_bytes=lm.dram_bytes,
                notes=dict(lm.notes), branch_rates=dict(lm.branch_rates))


def estimate_launch(dev, instrs, launch) -> dict:
    """estimate.estimate of one captured Triton launch, with its trips, DRAM bytes and branch rates derived by
    launch_model from the launch itself."""
    lm = launch_model.model(launch)
    return estimate.estimate(dev, instrs, lm.trips, int(launch.grid[0]), launch.num_warps, lm.dram_bytes,
                             lm.branch_rates)


def triton_section(entries, archs, out_dir, workers) -> dict:
    """{"rows": [...], "cubins": {key: numbers}, "skipped": reason or ''}."""
    version, why = tools.triton_status()
    if version is None:
        return dict(rows=[], cubins={}, skipped=why)
    cuobjdump, why = tools.cuobjdump()
    if cuobjdump is None:
        return dict(rows=[], cubins={}, skipped=why)
    from action_kernels.triton import _common

    planned, jobs = [], {}
    for arch in archs:
        for e in entries:
            with _common.capture(arch) as launches:
                matrix.call_launcher(e)
            items = []
            for launch in launches:
                req = triton_aot.specialise(launch, arch)
                key = triton_aot.request_key(req, arch)
                jobs[key] = (req, arch)
                items.append((launch, key))
            planned.append((arch, e, items))
    compiled = triton_aot.compile_all(jobs, out_dir, workers)
    cubins = {}
    for key, res in compiled.items():
        if "error" in res:
            cubins[key] = dict(error=res["error"])
            continue
        nums = cubin_numbers(cuobjdump, res["cubin"], res["symbol"])[res["symbol"]]
        cubins[key] = dict(nums, cubin=res["cubin"], symbol=res["symbol"], dynamic_shared=res["dynamic_shared"],
                           arch=jobs[key][1], compile_s=res.get("compile_s"))
    rows = []
    for arch, e, items in planned:
        dev = device(arch)
        kernels, total, ok = [], 0.0, True
        for launch, key in items:
            c = cubins[key]
            k = dict(_launch_summary(launch, launch_model.model(launch)), cubin_key=key)
            if "error" in c:
                k["error"], ok = c["error"], False
                kernels.append(k)
                continue
            shared = c["static_shared"] + c["dynamic_shared"]
            k.update({n: c[n] for n in ("registers", "stack", "static_shared", "dynamic_shared", "ldl", "stl",
                                        "ffma", "mufu", "tensor", "tensor_instructions")})
            k["occupancy"] = estimate.occupancy(dev, c["registers"], launch.num_warps, shared)
            est = estimate_launch(dev, c["_instrs"], launch)
            k["estimate_ms"], k["bound"], k["pipes_ms"] = est["ms"], est["bound"], est["pipes_ms"]
            if est["note"]:
                k["estimate_note"] = est["note"]
            total += est["ms"]
            kernels.append(k)
        floor = estimate.floor_ms(dev, e.gemms, e.N, e.K, e.D)
        rows.append(dict(arch=arch, op=e.op, mode=e.mode, dtype=e.dtype, D=e.D, N=e.N, K=e.K, k=e.k,
                         kernels=kernels, estimate_ms=total if ok else None, floor_ms=floor,
                         gemm_equivalents=e.gemms, ratio=(total / floor) if ok else None))
    for c in cubins.values():
        c.pop("_instrs", None)
    return dict(rows=rows, cubins=cubins, skipped="", triton=version)


def cuda_section(entries, archs, out_dir) -> dict:
    return cuda_aot.section(entries, archs, out_dir, cubin_numbers)
