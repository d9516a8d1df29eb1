"""The ops in a MONAI loop: BasicUNet with a forward hook on its last decoder block, MONAI dict transforms, Dataset
and DataLoader (batches of MetaTensors), DiceCELoss, plus ACTION's two losses against action_kernels.MemoryBank
banks of EMA-teacher embeddings. Synthetic 2D images (or 3D volumes with --dims 3). Needs `pip install monai`:

    python examples/monai_loop.py --iterations 30
    python examples/monai_loop.py --dims 3 --size 32 --batch 2 --iterations 5

What to copy: MetaTensors and MONAI's (B, 1, *S) label maps go into the ops and the banks as they are (no
.as_tensor(), no squeeze, no flattening); the banks are pushed after optimizer.step().
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, RandFlipd, RandRotate90d, ScaleIntensityd
from torch import nn

import action_kernels as ak

FEATURES = (8, 8, 16, 32, 64, 8)  # BasicUNet's channels; the hooked decoder block (upcat_1) gives the last one


def synthetic_items(count: int, size: int, dims: int, num_classes: int, seed: int) -> list[dict]:
    """{"image": float32 (*S,), "label": int64 (*S,)}: balls of classes 1..C-1 on background 0, intensity rising
    with the class, plus noise (numpy arrays, as a MONAI data list holds them before its transforms)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * dims, indexing="ij"))
    items = []
    for _ in range(count):
        label = np.zeros((size,) * dims, dtype=np.int64)
        for c in range(1, num_classes):
            centre = rng.integers(size // 6, size - size // 6, dims).reshape(dims, *[1] * dims)
            radius = size / 10 + rng.random() * size / 8
            label[((grid - centre) ** 2).sum(0) < radius ** 2] = c
        image = (label / num_classes + 0.15 * rng.standard_normal(label.shape)).astype(np.float32)
        items.append({"image": image, "label": label})
    return items


class Segmenter(nn.Module):
    """BasicUNet + a projection head on the output of its last decoder block (read by a forward hook):
    x (B, 1, *S) -> logits (B, C, *S), embeddings (B, emb_dim, *S)."""

    def __init__(self, dims: int, num_classes: int, emb_dim: int):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=dims, in_channels=1, out_channels=num_classes, features=FEATURES)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.head = nn.Sequential(conv(FEATURES[-1], 32, 1), nn.ReLU(), conv(32, emb_dim, 1))
        self._decoder = None
        self.unet.upcat_1.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._decoder = output

    def forward(self, x):
        logits = self.unet(x)
        return logits, self.head(self._decoder)


def train(iterations: int = 30, dims: int = 2, size: int = 32, batch: int = 4, num_classes: int = 3,
          emb_dim: int = 16, bank_size: int = 2048, push_rows: int = 256, seed: int = 0,
          device: str = "cpu") -> list[dict]:
    """The loop; returns one dict of loss values per iteration."""
    torch.manual_seed(seed)
    keys = ["image", "label"]
    transforms = Compose([EnsureChannelFirstd(keys, channel_dim="no_channel"), ScaleIntensityd("image"),
                          RandFlipd(keys, prob=0.5, spatial_axis=0),
                          RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1)), EnsureTyped(keys)])
    transforms.set_random_state(seed)
    loader = DataLoader(Dataset(synthetic_items(64, size, dims, num_classes, seed), transforms), batch_size=batch,
                        shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(seed))
    student = Segmenter(dims, num_classes, emb_dim).to(device)
    teacher = Segmenter(dims, num_classes, emb_dim).to(device)  # a fresh copy with its own hook
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    local_bank = ak.MemoryBank(bank_size, emb_dim, device=device)
    class_bank = ak.MemoryBank(bank_size, emb_dim, num_classes, device=device)
    g = torch.Generator().manual_seed(seed)
    history, it = [], 0
    while it < iterations:
        for data in loader:
            if it == iterations:
                break
            image, label = data["image"].to(device), data["label"].to(device)  # MetaTensors, label (B, 1, *S)
            logits, emb = student(image)
            with torch.no_grad():
                _, emb_t = teacher(image)
            seg = dice_ce(logits, label)
            local = ak.soft_contrastive_loss(emb, emb_t, local_bank.keys())  # 0, graph kept, while the bank is empty
            protos, _ = ak.class_prototypes(class_bank.keys(), class_bank.labels(), num_classes)
            anat = ak.anatomical_contrast_loss(emb, label.long(), protos, class_bank.keys(), class_bank.labels(),
                                               num_negatives=64)
            loss = seg + 0.1 * local + 0.1 * anat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), student.parameters()):
                    pt.lerp_(ps, 0.01)
                for bt, bs in zip(teacher.buffers(), student.buffers()):
                    bt.copy_(bs)
            # about push_rows random pixels (B, 1, *S), like the label: a push larger than the bank would keep only
            # its last rows, the end of the last image
            keep = torch.rand(label.shape, generator=g).to(device) < push_rows / label.numel()
            local_bank.push(emb_t, mask=keep)
            class_bank.push(emb_t, labels=label.long(), mask=keep)
            history.append({"iteration": it, "loss": loss.item(), "dice_ce": seg.item(), "local": local.item(),
                            "anatomical": anat.item(), "bank": class_bank.count})
            it += 1
    return history


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--size", type=int, default=32, help="spatial size (multiple of 16 for BasicUNet)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    history = train(args.iterations, args.dims, args.size, args.batch, device=args.device)
    shown = sorted({*range(0, len(history), max(1, len(history) // 8)), len(history) - 1})
    for h in (history[i] for i in shown):
        print(f"iteration {h['iteration']:3d}  loss {h['loss']:.4f}  dice+ce {h['dice_ce']:.4f}  local "
              f"{h['local']:.4f}  anatomical {h['anatomical']:.4f}  bank rows {h['bank']}")
    return history


if __name__ == "__main__":
    main()
