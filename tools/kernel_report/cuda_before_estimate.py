"""Static ESTIMATE of the FFMA kernels of c796c29 (before issue 14's tensor-core kernels) at N = K = 65,536,
D = 128, sm_90, by the kernel report's own model (estimate.estimate), with a trip count for every SASS loop.

c796c29's launch plans list two trip counts for four to eight SASS loops; the report then counts every loop once,
so its own rows for those kernels are far too low. Here the trips per CTA, in total, are read off the SASS of
each loop (unroll factors from the FFMA / LDG counts of its body); data-dependent loops (the top-k insertion)
count once. Usage (docs/cuda_kernels.md, Static estimates):

    git worktree add --detach /tmp/before c796c29 && cd /tmp/before && git merge wip/k13
    python -m action_kernels.kernel_report --no-triton --arch sm_90 --dims 128 --dtypes bf16 --dump-cubins /tmp/cubins
    python -m tools.kernel_report.cuda_before_estimate /tmp/cubins     (from this checkout's root)

(the report lived in the package, action_kernels/kernel_report/, at that commit)
"""
import glob
import sys

from tools.kernel_report import cuda_aot, estimate, sass, tools
from tools.kernel_report.devices import device

cu = tools.cuobjdump()[0]
dev = device(90)
N = K = 65536
D = 128
kt = K // 32            # key tiles per CTA (BN = 32)
d0 = kt * (D // 32)     # BK = 32 chunks
TRIPS = {  # per SASS loop in address order (outer to inner as the report orders them)
    "forward_kernel": [kt, d0, d0 * 7 // 2, d0 * 16],
    "row_grad_kernel": [kt, d0, d0 * 7 // 2, d0 * 16, kt * 2, kt * 32, kt * 32 * 2, 0],
    "key_grad_kernel": [kt, d0, d0 * 7 // 2, d0 * 16, kt * 2, kt * 32, kt * 32 * 8],
    "topk_kernel": [kt, d0, d0 * 2, d0 * 8, 1, 1, 1, 1],
}
funcs = {}
for cubin in glob.glob(sys.argv[1] + "/*sm90.cubin"):
    f = sass.disassemble(cu, cubin)
    names = cuda_aot.demangle(list(f))
    for sym, ins in f.items():
        funcs[cuda_aot.short_name(names[sym]).split("::")[-1]] = ins
out = {}
for name, trips in TRIPS.items():
    ins = funcs[name]
    nl = len(sass.loops(ins))
    assert nl == len(trips), (name, nl)
    est = estimate.estimate(dev, ins, trips, 2048, 4, 0.0)
    out[name] = est
    print(f"{name:16s} {est['ms']:9.2f} ms ({est['bound']})", {p: round(v, 1) for p, v in est["pipes_ms"].items()})
fg = out["forward_kernel"]["ms"] + out["row_grad_kernel"]["ms"]
print(f"forward {out['forward_kernel']['ms']:.1f}  forward_grad {fg:.1f}  key_grad {out['key_grad_kernel']['ms']:.1f}"
      f"  fwd+bwd {fg + out['key_grad_kernel']['ms']:.1f}  topk {out['topk_kernel']['ms']:.1f}")
