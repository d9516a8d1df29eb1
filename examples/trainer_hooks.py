"""A training stage of your own on the `action` Trainer's hooks: supervised segmentation plus ACTION's anatomical
contrast against a labelled action_kernels.MemoryBank of EMA-teacher embeddings. The Trainer brings the loop,
augmentation, seeding, checkpoints (the bank included, through extra_state), exact resume, the non-finite guard
and torchrun sharding; the stage brings its model, losses and bank. Synthetic slices by default (no data needed),
or an ACDC folder in the HDF5 layout:

    python examples/trainer_hooks.py --out runs/example --iterations 20
    python examples/trainer_hooks.py --out runs/example-acdc --data ../shared/data/acdc --size 64

The hooks used (action/engine/trainer.py lists them all): build_data, build_model, setup, eval_model,
compute_losses (calling defer), apply_deferred, after_step, extra_state, load_extra_state.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from torch import nn

import action_kernels as ak
from action.config import build_config
from action.data.labels import IGNORE_INDEX
from action.engine import Trainer, supervised_loss
from action.models import EMATeacher, RepresentationHead, build_network

SYNTHETIC = "synthetic"


def synthetic_slices(count: int, size: int, num_classes: int, seed: int) -> SimpleNamespace:
    """What Trainer.build_data returns, in memory: labelled images (N, 1, S, S) in [0, 1] with labels (N, S, S)
    (discs of classes 1..C-1 on background 0), no unlabelled images, no validation or test volumes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(count, size, size, dtype=torch.long)
    for n in range(count):
        for c in range(1, num_classes):
            cy, cx = torch.randint(size // 6, size - size // 6, (2,), generator=g).tolist()
            r = size / 10 + torch.rand((), generator=g).item() * size / 8
            labels[n][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    images = (labels.float() / num_classes + 0.1 * torch.randn(count, size, size, generator=g)).clamp(0, 1)
    return SimpleNamespace(images=images[:, None], labels=labels, unlabelled=None, names=[f"synthetic-{n}" for n in
                           range(count)], val_names=[], test_names=[], cases=lambda names: [])


class AnatomicalStage(Trainer):
    """L = L_sup + anco_weight * L_anco, L_anco = anatomical_contrast_loss of the student's embeddings against a
    MemoryBank of the EMA teacher's (labelled with the ground truth), prototypes the bank's class means."""

    stage = "example-anatomical"
    emb_dim, bank_size, push_rows, anco_weight = 16, 2048, 256, 0.1

    def build_data(self):
        if self.cfg.data == SYNTHETIC:
            return synthetic_slices(16, self.cfg.size, self.cfg.num_classes, self.cfg.seed)
        return super().build_data()

    def build_model(self) -> nn.Module:
        net = build_network(self.cfg)
        head = RepresentationHead(net.channels[3::-1], out_dim=self.emb_dim, hidden=32, dims=self.cfg.dims)
        return nn.ModuleDict({"net": net, "head": head})

    def setup(self) -> None:
        self.teacher = EMATeacher(self.model, self.cfg.ema_decay).to(self.device)
        # gather=False: the Trainer all-gathers what compute_losses defers, in shard order, before apply_deferred
        self.bank = ak.MemoryBank(self.bank_size, self.emb_dim, self.cfg.num_classes, device=self.device,
                                  ignore_label=IGNORE_INDEX, gather=False)

    def eval_model(self) -> nn.Module:
        return self.model["net"]

    def embed(self, model: nn.Module, x: torch.Tensor):
        logits, features, _ = model["net"](x, return_features=True)
        return logits, model["head"](features)

    def compute_losses(self, views: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = views["image_l"], views["label_l"]  # (B, 1, S, S), (B, S, S) with IGNORE_INDEX in cutout boxes
        logits, emb = self.embed(self.model, x)
        sup = supervised_loss(logits, y, IGNORE_INDEX)
        keys, key_labels = self.bank.keys(), self.bank.labels()
        protos, _ = ak.class_prototypes(keys, key_labels, self.cfg.num_classes, ignore_label=IGNORE_INDEX)
        anco = ak.anatomical_contrast_loss(emb, y, protos, keys, key_labels, num_negatives=64,
                                           ignore_label=IGNORE_INDEX)
        with torch.no_grad():
            _, emb_t = self.embed(self.teacher.module, x)
        keep = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < \
            self.push_rows / y.numel()
        self.defer("bank", emb_t, y, keep)  # pushed after the optimizer step (dropped if the step is not taken)
        return {"loss": sup["sup"] + self.anco_weight * anco, "sup": sup["sup"], "anco": anco}

    def apply_deferred(self, name: str, tensors: tuple) -> None:
        emb_t, y, keep = tensors
        self.bank.push(emb_t, labels=y, mask=keep)

    def after_step(self, iteration: int) -> None:
        self.teacher.update(self.model, iteration)

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "bank": self.bank.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.bank.load_state_dict(state["bank"])


def make_trainer(argv=None) -> tuple[AnatomicalStage, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (train.csv, last.pt)")
    parser.add_argument("--data", default=SYNTHETIC, help=f"an ACDC HDF5 folder, or {SYNTHETIC!r}")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="slice size, a multiple of 16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    args = parser.parse_args(argv)
    synthetic = args.data == SYNTHETIC
    cfg = build_config("smoke", overrides={
        "out": args.out, "data": args.data, "iterations": args.iterations, "size": args.size, "threads": args.threads,
        "labelled_batch": 4, "num_classes": 3 if synthetic else 4, "val_every": 0 if synthetic else 10,
        "test_at_end": False, "checkpoint_every": 5, "log_every": 1, "tensorboard": False,
        "augmentation": {"cutout_p": 0.5}})
    return AnatomicalStage(cfg, progress=False), args


def main(argv=None) -> AnatomicalStage:
    trainer, args = make_trainer(argv)
    trainer.fit(resume=args.resume)
    print(f"{trainer.iteration} iterations in {args.out} (train.csv, last.pt); bank rows {trainer.bank.count}")
    return trainer


if __name__ == "__main__":
    main()
