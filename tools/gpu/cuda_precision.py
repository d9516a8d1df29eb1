"""Error of the CUDA kernels' arithmetic against float64, per input dtype (the fp32 path is 3xTF32).

Runs the CUDA backend's kernels on CPU tensors through the emulation build (action_kernels._C_cpu: the kernels'
own code, mma products as the PTX ISA defines them; on a GPU pass --device cuda), the float64 reference on the
same rounded inputs, and prints the largest error of the per-row loss, the row and the key gradient relative to
the largest reference magnitude, next to the torch backend in the same dtype for comparison:

    python tools/gpu/cuda_precision.py -N 256 -K 1024 -D 128
"""
from __future__ import annotations

import argparse

import torch

import action_kernels as ak


def run(backend, s, t, k, taus, device):
    s = s.to(device).detach().clone().requires_grad_(True)
    k = k.to(device).detach().clone().requires_grad_(True)
    loss = ak.soft_contrastive_loss(s, t.to(device), k, *taus, reduction="none", backend=backend)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device)).sum().backward()
    return [x.detach().double().cpu() for x in (loss, s.grad, k.grad)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-N", type=int, default=256)
    ap.add_argument("-K", type=int, default=1024)
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.N, args.D, generator=g)
    t = s + 0.7 * torch.randn(args.N, args.D, generator=g)
    k = torch.randn(args.K, args.D, generator=g)
    print(f"N={args.N} K={args.K} D={args.D}; max |x - ref| / max |ref| per output (float64 reference)")
    print("| dtype | taus | backend | loss | row grad | key grad |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for taus in ((0.1, 0.01), (1.0, 1.0)):
            x = [v.to(dtype) for v in (s, t, k)]
            ref = run("torch", *(v.double() for v in x), taus, "cpu")
            for backend in ("cuda", "torch"):
                got = run(backend, *x, taus, args.device)
                errs = [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(got, ref)]
                print(f"| {str(dtype).split('.')[-1]} | {taus} | {backend} | " + " | ".join(f"{e:.1e}" for e in errs)
                      + " |")


if __name__ == "__main__":
    main()
