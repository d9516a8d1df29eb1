"""Choosing the launch tables: compile candidate configurations of one Triton kernel and rank them by the static
estimate, keeping only those without local memory that can launch (how the CONFIGS tables were filled).

    python -m tools.kernel_report.tune --op soft_contrastive --kernel forward --arch 90 --dtype bf16 --dim 128

Prints one line per candidate (best first) and the table entry to paste. A ranking by a static estimate, not a
measurement: on a GPU, benchmarks/bench_loss.py decides.
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile

from tools.kernel_report import estimate, matrix, report, tools, triton_aot
from tools.kernel_report.devices import device

MODE_OF = {"forward": "forward", "row_grad": "forward_grad", "key_grad": "key_grad", "topk_scan": "topk"}


def _table(op: str):
    if op == "soft_contrastive":
        from action_kernels.triton import soft_contrastive as mod
    else:
        from action_kernels.triton import hard_negative_topk as mod
    return mod


def candidates(op: str, kernel: str, fp32: bool, arch: int, quick: bool):
    """The search space: tiles the tensor cores take (>= 16), warps 4 or 8, 1-2 stages, and on sm_80 or for fp32
    also re-reading the loop-invariant operand (RELOAD); --quick keeps 64-row tiles and 2 stages."""
    reload = (False, True) if (arch < 90 or fp32) else (False,)
    tiles = (16, 32, 64) if fp32 else (32, 64, 128)
    if quick:
        yield from itertools.product((32, 64), (16, 32, 64) if fp32 else (32, 64), (4, 8), (2,), reload)
    elif op == "soft_contrastive":
        yield from itertools.product(tiles, tiles, (4, 8), (1, 2), reload)
    else:
        yield from itertools.product((32, 64, 128), (32, 64) if fp32 else (64, 128), (4, 8), (2,), reload)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="soft_contrastive", choices=("soft_contrastive", "hard_negative_topk"))
    ap.add_argument("--kernel", default="forward")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16", choices=tuple(matrix.DTYPES))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="a smaller search space")
    args = ap.parse_args(argv)
    return tune(args)


def tune(args) -> int:
    from action_kernels.triton import _common

    mod = _table(args.op)
    mode = MODE_OF[args.kernel]
    N, K = matrix.N_TARGET, matrix.K_TARGET
    e = matrix.Entry(args.op, mode, args.dtype, args.dim, N, K, args.k if args.op != "soft_contrastive" else 0)
    key = mod.config_key(args.kernel, args.arch, matrix.DTYPES[args.dtype], _common.block_d(args.dim), args.k)
    saved = mod.CONFIGS.get(key)
    jobs, plans = {}, []
    try:
        for cand in candidates(args.op, args.kernel, args.dtype == "fp32", args.arch, args.quick):
            mod.CONFIGS[key] = cand
            with _common.capture(args.arch) as launches:
                matrix.call_launcher(e)
            launch = next(x for x in launches if x.name == args.kernel)
            req = triton_aot.specialise(launch, args.arch)
            rk = triton_aot.request_key(req, args.arch)
            jobs[rk] = (req, args.arch)
            plans.append((cand, launch, rk))
    finally:
        if saved is None:
            mod.CONFIGS.pop(key, None)
        else:
            mod.CONFIGS[key] = saved
    cuobjdump = tools.cuobjdump()[0]
    dev = device(args.arch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        done = triton_aot.compile_all(jobs, tmp, args.jobs)
        for cand, launch, rk in plans:
            res = done[rk]
            if "error" in res:
                continue
            n = report.cubin_numbers(cuobjdump, res["cubin"], res["symbol"])[res["symbol"]]
            shared = n["static_shared"] + res["dynamic_shared"]
            occ = estimate.occupancy(dev, n["registers"], launch.num_warps, shared)
            est = report.estimate_launch(dev, n["_instrs"], launch)
            clean = n["stack"] == 0 and n["ldl"] == 0 and n["stl"] == 0 and occ["ctas_per_sm"] > 0
            rows.append((not clean, est["ms"], cand, n, occ, est))
    rows.sort(key=lambda r: (r[0], r[1]))
    for bad, ms, cand, n, occ, est in rows[:args.top]:
        pipes = " ".join(f"{p}={v:.2f}" for p, v in sorted(est["pipes_ms"].items(), key=lambda x: -x[1])[:4])
        print(f"{'SPILLS ' if bad else ''}{cand}: est {ms:.3f} ms  REG {n['registers']} STACK {n['stack']} "
              f"LDL/STL {n['ldl']}/{n['stl']} smem {shared_kib(n, res_dyn(done, plans, cand)):.0f} KiB "
              f"CTAs/SM {occ['ctas_per_sm']}  [{pipes}]")
    if rows and not rows[0][0]:
        print(f"table entry: {key!r}: {rows[0][2]!r},", flush=True)
    else:
        print(f"table entry: {key!r}: NONE without local memory", flush=True)
    return 0


def shared_kib(n, dyn):
    return (n["static_shared"] + dyn) / 1024


def res_dyn(done, plans, cand):
    rk = next(r for c, _, r in plans if c == cand)
    return done[rk].get("dynamic_shared", 0)


if __name__ == "__main__":
    raise SystemExit(main())
