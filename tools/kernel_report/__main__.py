"""python -m tools.kernel_report [--arch sm_80,sm_90] [--json FILE] [--dump-cubins DIR] [...]

Compiles, ahead of time and without a GPU, the kernels and launch configurations the launchers would run for each
op x dtype x feature size x mode, and the CUDA kernels of csrc/, and reports what the cubins say: registers, stack
(local memory), local loads/stores, shared memory, occupancy, tensor-core against FFMA instructions, and a static
time ESTIMATE next to the floor (GEMM-equivalents at the published dense peak). docs/kernel-report.md explains the
numbers and the estimate's model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from tools.kernel_report import matrix, report


def _archs(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        p = part.strip().lower().removeprefix("sm_")
        if not p.isdigit():
            raise SystemExit(f"--arch expects a comma-separated list such as sm_80,sm_90, got {text!r}")
        out.append(int(p))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.kernel_report", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_80,sm_90", help="target architectures (default sm_80,sm_90)")
    ap.add_argument("--json", help="write the whole report as JSON to this file")
    ap.add_argument("--dump-cubins", help="keep every compiled cubin and a manifest.json in this folder")
    ap.add_argument("--markdown", help="also write the printed tables to this file")
    ap.add_argument("--ops", default="soft_contrastive,hard_negative_topk,anatomical")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--dims", default="64,128,256,512")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    return ap.parse_args(argv)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _kernel_cells(k: dict) -> list[str]:
    if "error" in k:
        return [k.get("kernel", "?"), "compile failed: " + k["error"]] + [""] * 9
    tiles = k.get("tiles", {})
    t = "x".join(str(tiles[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if n in tiles)
    extra = "".join(f" {n}={tiles[n]}" for n in ("KP", "W") if n in tiles)
    occ = k["occupancy"]
    tensor = ", ".join(f"{n} {c}" for n, c in k["tensor"].items()) or "none"
    smem = (k["static_shared"] + k["dynamic_shared"]) / 1024
    return [k["kernel"], f"{t}{extra} w{k['num_warps']} s{k['num_stages']}", str(k["registers"]), str(k["stack"]),
            f"{k['ldl']}/{k['stl']}", f"{smem:.1f}", f"{occ['ctas_per_sm']} ({occ['warps_per_sm']})", tensor,
            str(k["ffma"]), str(k["mufu"]), f"{k['estimate_ms']:.3f} ({k['bound']})"]


def _mode(r: dict) -> str:
    return r["mode"] + (f" k={r['k']}" if r["k"] else "")


def triton_tables(sec: dict) -> list[str]:
    if sec["skipped"]:
        return [f"Triton kernels: not compiled: {sec['skipped']}"]
    lines = [f"Triton kernels (triton {sec['triton']}), per launch; est. = static ESTIMATE at N, K of the entry:", "",
             "| arch | op | mode | dtype | D | kernel | tiles, warps, stages | REG | STACK B | LDL/STL | SMEM KiB | "
             "CTAs/SM (warps) | tensor instr. | FFMA | MUFU | est. ms (bound) |",
             "|" + "---|" * 16]
    for r in sec["rows"]:
        for k in r["kernels"]:
            head = [f"sm_{r['arch']}", r["op"], _mode(r), r["dtype"], str(r["D"])]
            lines.append("| " + " | ".join(head + _kernel_cells(k)) + " |")
    notes = [f"- sm_{r['arch']} {r['op']} {_mode(r)} {r['dtype']} D={r['D']} {k['kernel']}: {k['estimate_note']}"
             for r in sec["rows"] for k in r["kernels"] if k.get("estimate_note")]
    if notes:
        lines += ["", "Estimate notes (the model's assumptions for these launches, docs/kernel-report.md):", *notes]
    if any(r["dtype"] == "fp32" for r in sec["rows"]):
        from action_kernels.dispatch import TRITON_FP32_REASON
        lines += ["", f"fp32 rows: not offered on CUDA tensors (dispatch refuses them: {TRITON_FP32_REASON})."]
    return lines + [""] + summary_table(sec["rows"], "Triton")


def summary_table(rows: list[dict], what: str) -> list[str]:
    lines = [f"{what}: static ESTIMATE per mode against its floor (GEMM-equivalents x 2 N K D at the published "
             f"dense 16-bit peak):", "",
             "| arch | op | mode | dtype | D | N | K | est. ms | floor ms (GEMMs) | est./floor |",
             "|" + "---|" * 10]
    for r in rows:
        mode = _mode(r)
        est = _fmt(r["estimate_ms"]) if r.get("estimate_ms") is not None else (r.get("note") or "-")
        lines.append(f"| sm_{r['arch']} | {r['op']} | {mode} | {r['dtype']} | {r['D']} | {r['N']:,} | {r['K']:,} | "
                     f"{est} | {r['floor_ms']:.3f} ({r.get('gemm_equivalents', '')}) | "
                     f"{_fmt(r.get('ratio'), '.2f')} |")
    return lines


def cuda_tables(sec: dict) -> list[str]:
    if sec["skipped"]:
        return [f"CUDA kernels: not compiled: {sec['skipped']}"]
    lines = ["CUDA kernels of csrc/ (nvcc -O3 -std=c++17 -cubin):", "",
             "| arch | source | kernel | REG | STACK B | LDL/STL | SMEM KiB (static) | tensor instr. | FFMA | MUFU |",
             "|" + "---|" * 10]
    for k in sec["kernels"]:
        if "error" in k:
            lines.append(f"| sm_{k['arch']} | {k['source']} | nvcc failed: {k['error'][:200]} |" + " |" * 7)
            continue
        tensor = ", ".join(f"{n} {c}" for n, c in k["tensor"].items()) or "none"
        lines.append(f"| sm_{k['arch']} | {k['source']} | {k['short_name']} | {k['registers']} | {k['stack']} | "
                     f"{k['ldl']}/{k['stl']} | {k['static_shared'] / 1024:.1f} | {tensor} | {k['ffma']} | "
                     f"{k['mufu']} |")
    if not sec.get("launch_plans"):
        return lines + ["", f"CUDA estimates: none, {report.cuda_aot.NO_PLAN}."]
    return lines + [""] + summary_table(sec["rows"], "CUDA")


def manifest(result: dict) -> dict:
    files = {}
    for key, c in result["triton"].get("cubins", {}).items():
        if "cubin" not in c:
            continue
        files[os.path.basename(c["cubin"])] = dict(
            backend="triton", kernel=c["symbol"], arch=c["arch"],
            numbers={n: c[n] for n in ("registers", "stack", "static_shared", "dynamic_shared", "ldl", "stl", "ffma",
                                       "mufu", "tensor", "tensor_instructions", "sass_instructions", "loops")},
            uses=[])
        for r in result["triton"]["rows"]:
            for k in r["kernels"]:
                if k.get("cubin_key") == key and "error" not in k:
                    files[os.path.basename(c["cubin"])]["uses"].append(dict(
                        op=r["op"], mode=r["mode"], dtype=r["dtype"], D=r["D"], N=r["N"], K=r["K"], k=r["k"],
                        launch=dict(tiles=k["tiles"], num_warps=k["num_warps"], num_stages=k["num_stages"],
                                    grid=k["grid"], trips=k["trips"], branch_rates=k["branch_rates"],
                                    notes=k["notes"]),
                        occupancy=k["occupancy"], estimate_ms=k["estimate_ms"], bound=k["bound"],
                        estimate_note=k.get("estimate_note", ""),
                        mode_estimate_ms=r["estimate_ms"], mode_floor_ms=r["floor_ms"], mode_ratio=r["ratio"]))
    for k in result["cuda"].get("kernels", []):
        if "cubin" not in k:
            continue
        entry = files.setdefault(os.path.basename(k["cubin"]), dict(backend="cuda", arch=k["arch"],
                                                                    source=k["source"], kernels=[]))
        entry["kernels"].append(dict(symbol=k["symbol"], name=k["name"], numbers={
            n: k[n] for n in ("registers", "stack", "static_shared", "ldl", "stl", "ffma", "mufu", "tensor",
                              "tensor_instructions", "sass_instructions", "loops")}))
    return dict(note="static numbers of each cubin; every estimate is a static ESTIMATE, not a measurement",
                files=files)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # kernels defined under the interpreter cannot be compiled: rerun this command with it off
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.run([sys.executable, "-m", "tools.kernel_report", *(argv or sys.argv[1:])],
                              env=env).returncode
    archs = _archs(args.arch)
    entries = matrix.entries(tuple(d.strip() for d in args.dtypes.split(",")),
                             tuple(int(d) for d in args.dims.split(",")), tuple(args.ops.split(",")))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.dump_cubins or tmp
        result = dict(
            archs=archs,
            triton=(dict(rows=[], cubins={}, skipped="--no-triton") if args.no_triton else
                    report.triton_section(entries, archs, out_dir, args.jobs)),
            cuda=(dict(kernels=[], rows=[], skipped="--no-cuda") if args.no_cuda else
                  report.cuda_section(entries, archs, out_dir)))
        result["seconds"] = round(time.time() - t0, 1)
        if args.dump_cubins:
            with open(os.path.join(out_dir, "manifest.json"), "w") as f:
                json.dump(manifest(result), f, indent=1)
    text = "\n".join(triton_tables(result["triton"]) + [""] + cuda_tables(result["cuda"]))
    text += f"\n\n({result['seconds']} s; all times are static estimates, see docs/kernel-report.md)"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
