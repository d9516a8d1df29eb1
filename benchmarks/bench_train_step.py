"""One ACTION stage-iii training step, ours against the reference code's style, side by side.

    python benchmarks/bench_train_step.py                  # 128x128, batch 4 + 4, real ACDC slices when present

Both providers run the same steps on the same batches and weights (Trainer.step: batch, teacher pseudo-labels,
joint augmentation, cutmix, student forward, L_sup + L_unsup + 0.01 L_anco, backward, SGD step, EMA update) and
differ only in compute_losses, where the reference code differs:
  reference  the reference code's loss code: the pseudo-label weights computed per image with host syncs, the
             hard queries and every negative drawn on the host (NumPy: per-query Python loop choosing each
             negative's class from the prototype graph and a pixel of that class), a [256, 513, D] key tensor per
             class, cosine similarity, cross-entropy (the `naive` anatomical provider of bench_loss.py)
  ours       action.method.Finetuner.compute_losses: vectorised sampling on the device from one generator, the fused
             top-k hard negatives and anatomical_contrast_loss (negatives "topk"), or "class_graph" (the reference
             sampling, vectorised) with --negatives class_graph
Time: median and range of whole steps over repeats, providers interleaved. Memory: peak extra RSS of one step in
a fresh subprocess (CPU) or max_memory_allocated (CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from action.config import build_config  # noqa: E402
from action.method import Finetuner  # noqa: E402
from bench_loss import _rss_field, environment  # noqa: E402
from workloads import AnatomicalContrast  # noqa: E402

ACDC = os.environ.get("ACTION_ACDC", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                  "data", "acdc"))


class ReferenceStyleFinetuner(Finetuner):
    """The same step with the reference code's loss implementations (see the module docstring)."""

    def compute_losses(self, views, generator):
        from action.engine.losses import dice_loss

        cfg, ignore = self.cfg, self.augment.config.ignore_index
        x_l, y_l, x_u, y_u, conf_u = (views[k] for k in ("image_l", "label_l", "image_u", "pseudo_u", "conf_u"))
        B = x_l.shape[0]
        logits, feats = self.student_forward(x_l, x_u)  # the same forward(s) as ours
        ce_l = F.cross_entropy(logits[:B].float(), y_l, ignore_index=ignore)
        sup = 0.5 * (ce_l + dice_loss(logits[:B].float().softmax(1), y_l, ignore))
        # pseudo-label loss, per image with host syncs
        unsup_terms, positive = [], 0
        for b in range(x_u.shape[0]):
            valid = y_u[b] != ignore
            w = float(((conf_u[b] >= cfg.strong_threshold) & valid).sum().item()) / max(1, int(valid.sum().item()))
            ce = F.cross_entropy(logits[B + b:B + b + 1].float(), y_u[b:b + 1].masked_fill(~valid[None], 0),
                                 reduction="none")[0] * valid
            positive += int((ce > 0).sum().item())
            unsup_terms.append((ce * w).sum())
        unsup = torch.stack(unsup_terms).sum() / max(1, positive)
        # anatomical contrast: host-side sampling, materialised keys
        s = cfg.rep_stride
        rep = self.model["rep"](feats, size=(cfg.size // s, cfg.size // s))
        y_small, probs = self.grid_targets(views, logits)  # the same grid labels (-1: not valid) and probabilities
        y_small = y_small.reshape(-1)
        probs = probs.permute(0, 2, 3, 1).reshape(-1, cfg.num_classes)
        ignore = -1
        rows = rep.permute(0, 2, 3, 1).reshape(-1, rep.shape[1])
        y_np, p_np = y_small.cpu().numpy(), probs.cpu().numpy()  # the reference's CPU round trip
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
        valid = y_np != ignore
        present = [c for c in range(cfg.num_classes) if (valid & (y_np == c)).any()]
        if len(present) < 2:
            anco = rows.sum() * 0.0
        else:
            q_idx, yq = [], []
            for c in present:
                hard = np.nonzero(valid & (y_np == c) & (p_np[:, c] < cfg.strong_threshold))[0]
                if len(hard):
                    q_idx.append(hard[rng.integers(0, len(hard), cfg.queries_per_class)])
                    yq.append(np.full(cfg.queries_per_class, c))
            keys = rows.detach()
            protos = torch.stack([keys[torch.from_numpy(np.nonzero(valid & (y_np == c))[0])].mean(0)
                                  if (valid & (y_np == c)).any() else keys.new_zeros(keys.shape[1])
                                  for c in range(cfg.num_classes)])
            yk = torch.from_numpy(np.where(valid, y_np, cfg.num_classes + 7))  # invalid pixels: a class never drawn
            loss_ref = AnatomicalContrast()
            loss_ref.classes, loss_ref.negatives, loss_ref.tau = cfg.num_classes, cfg.num_negatives, cfg.anco_tau
            if q_idx:
                q = torch.from_numpy(np.concatenate(q_idx))
                anco = loss_ref.naive(rows[q], torch.from_numpy(np.concatenate(yq)), protos, keys, yk)
            else:
                anco = rows.sum() * 0.0
        loss = sup + self.unsup_weight() * unsup + cfg.anco_weight * anco
        return {"loss": loss, "sup": sup, "unsup": unsup, "anco": anco}


PROVIDERS = {"reference": ReferenceStyleFinetuner, "ours": Finetuner}


def make_trainer(name: str, args, out: str):
    overrides = {"data": args.data, "out": out, "stage": "finetune", "size": args.size, "labelled_batch": args.batch,
                 "unlabelled_batch": args.batch, "max_train_slices": 16, "tensorboard": False, "val_every": 0,
                 "test_at_end": False, "device": args.device, "negatives": args.negatives, "amp": "off"}
    trainer = PROVIDERS[name](build_config(overrides=overrides), progress=False)
    torch.manual_seed(0)  # identical weights for every provider
    fresh = type(trainer.model["net"])(1, 4).to(trainer.device)
    trainer.model["net"].load_state_dict(fresh.state_dict())
    trainer.teacher.module["net"].load_state_dict(fresh.state_dict())
    return trainer


def step(trainer, t: int) -> float:
    """One whole training step (Trainer.step: batch, preparation, losses, backward, SGD, EMA) in ms."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    trainer.step(t)
    sync()
    return (time.perf_counter() - t0) * 1e3


def child_memory(name: str, args) -> None:
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, args, out)
        step(trainer, 0)  # warm-up: libraries, allocator, caches
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(trainer, 1)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            base = _rss_field("VmRSS")
            step(trainer, 1)
            peak = (_rss_field("VmHWM") - base) / 2**20
    print(json.dumps({"peak_extra_mib": peak}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=ACDC, help="ACDC HDF5 folder (the batch is real slices)")
    ap.add_argument("--size", type=int, default=128, help="image size (default 128)")
    ap.add_argument("--batch", type=int, default=4, help="labelled and unlabelled images per batch (default 4 + 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--negatives", default="topk", choices=("topk", "class_graph"), help="ours: negative selection")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default="bench_results", help="folder for the JSON result")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "data")):
        raise SystemExit(f"--data {args.data}: no ACDC HDF5 folder (data/*.h5); set --data or ACTION_ACDC")
    if args.child_memory:
        child_memory(args.child_memory, args)
        return 0
    env = environment()
    print(f"stage-iii training step, {args.size}x{args.size}, batch {args.batch} + {args.batch}, {args.device} "
          f"({env['device_name']}, {env['threads']} threads), commit {env['commit']}", flush=True)
    times = {name: [] for name in PROVIDERS}
    with tempfile.TemporaryDirectory() as out:
        trainers = {name: make_trainer(name, args, os.path.join(out, name)) for name in PROVIDERS}
        for name, tr in trainers.items():
            step(tr, 0)  # warm-up
        names = list(PROVIDERS)
        for r in range(args.repeats):
            for name in names[r % 2:] + names[:r % 2]:
                times[name].append(step(trainers[name], 1 + r))
    rows = {}
    for name in PROVIDERS:
        med = statistics.median(times[name])
        rows[name] = {"median_ms": med, "min_ms": min(times[name]), "max_ms": max(times[name])}
        if not args.no_memory:
            cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", name, "--data", args.data,
                   "--size", str(args.size), "--batch", str(args.batch), "--device", args.device,
                   "--negatives", args.negatives]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ,
                                                                                MALLOC_MMAP_THRESHOLD_="65536"))
            if proc.returncode:
                print(f"memory run of {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            else:
                rows[name]["peak_extra_mib"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_mib"]
    ref = rows["reference"]
    print(f"\n{'provider':10s} {'step ms (min-max)':>26s} {'speedup':>8s} {'peak MiB':>9s} {'mem vs ref':>10s}")
    for name, r in rows.items():
        mem = r.get("peak_extra_mib")
        ratio = f"1/{ref['peak_extra_mib'] / mem:.1f}" if mem and ref.get("peak_extra_mib") else "-"
        print(f"{name:10s} {r['median_ms']:12.1f} ({r['min_ms']:.0f}-{r['max_ms']:.0f}) "
              f"{ref['median_ms'] / r['median_ms']:7.2f}x {mem if mem is not None else float('nan'):9.1f} {ratio:>10s}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_train_step.json")
    with open(path, "w") as fh:
        json.dump({"environment": env, "settings": vars(args), "results": rows}, fh, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
