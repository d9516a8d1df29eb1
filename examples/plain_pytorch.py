"""The ops in a plain PyTorch loop: a small segmentation network and its EMA teacher trained with cross-entropy,
ACTION's pixel-wise soft-label distillation (soft_contrastive_loss) and its anatomical contrast
(anatomical_contrast_loss), both against action_kernels.MemoryBank banks of teacher embeddings, on synthetic
images with an ignore label. Nothing of the `action` training package is used. Runs on the CPU in seconds:

    python examples/plain_pytorch.py --iterations 40

What to copy: losses read bank.keys() / bank.labels(); the banks are pushed after optimizer.step() with the
teacher's embeddings (maps and label maps as they are, a random subset chosen by a mask); the ignore label is the
caller's (255 here) and is passed to the ops and to the bank.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import action_kernels as ak

IGNORE = 255  # this loop's ignore label (cutout boxes): the ops take it as ignore_label


def synthetic_batch(batch: int, size: int, num_classes: int, generator: torch.Generator):
    """Images (B, 1, S, S): discs of classes 1..C-1 on background 0, intensity rising with the class, plus noise;
    labels (B, S, S) int64, with a cutout box labelled IGNORE (and zeroed in the image)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for c in range(1, num_classes):
            cy, cx = torch.randint(size // 6, size - size // 6, (2,), generator=generator).tolist()
            r = size / 10 + torch.rand((), generator=generator).item() * size / 8
            labels[b][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    images = labels.float() / num_classes + 0.15 * torch.randn(batch, size, size, generator=generator)
    for b in range(batch):  # cutout: counted by no loss
        y0, x0 = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
        labels[b, y0:y0 + size // 4, x0:x0 + size // 4] = IGNORE
        images[b, y0:y0 + size // 4, x0:x0 + size // 4] = 0.0
    return images[:, None], labels


class TinySegNet(nn.Module):
    """x (B, 1, S, S) -> logits (B, C, S, S) and an embedding map (B, emb_dim, S, S) (a projection head)."""

    def __init__(self, num_classes: int, width: int = 16, emb_dim: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.classify = nn.Conv2d(width, num_classes, 1)
        self.embed = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, emb_dim, 1))

    def forward(self, x):
        f = self.body(x)
        return self.classify(f), self.embed(f)


def train(iterations: int = 40, batch: int = 4, size: int = 32, num_classes: int = 3, emb_dim: int = 16,
          bank_size: int = 2048, push_rows: int = 256, seed: int = 0, device: str = "cpu") -> list[dict]:
    """The loop; returns one dict of loss values per iteration."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student = TinySegNet(num_classes, emb_dim=emb_dim).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    local_bank = ak.MemoryBank(bank_size, emb_dim, device=device)  # teacher embeddings (distillation keys)
    class_bank = ak.MemoryBank(bank_size, emb_dim, num_classes, device=device, ignore_label=IGNORE)  # with labels
    history = []
    for it in range(iterations):
        x, y = (t.to(device) for t in synthetic_batch(batch, size, num_classes, g))
        logits, emb = student(x)
        with torch.no_grad():
            _, emb_t = teacher(x)
        ce = F.cross_entropy(logits, y, ignore_index=IGNORE)
        valid = y != IGNORE
        # local distillation: each pixel's distribution over the bank, student against teacher (an empty bank,
        # at iteration 0, has no keys to distil over)
        local = ak.soft_contrastive_loss(emb, emb_t, local_bank.keys(), weight=valid) if local_bank.count \
            else emb.sum() * 0.0
        # anatomical contrast: each labelled pixel against its class prototype and the hardest keys of other classes
        protos, _ = ak.class_prototypes(class_bank.keys(), class_bank.labels(), num_classes, ignore_label=IGNORE)
        anat = ak.anatomical_contrast_loss(emb, y, protos, class_bank.keys(), class_bank.labels(), tau=0.5,
                                           num_negatives=64, ignore_label=IGNORE)
        loss = ce + 0.1 * local + 0.1 * anat
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # EMA teacher
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.lerp_(ps, 0.01)
            for bt, bs in zip(teacher.buffers(), student.buffers()):
                bt.copy_(bs)
        # after the step: a random subset of the teacher's pixels into both banks (ignored pixels drop out)
        keep = torch.rand(y.shape, generator=g).to(device) < push_rows / y.numel()  # about push_rows pixels
        local_bank.push(emb_t, mask=keep & valid)
        class_bank.push(emb_t, labels=y, mask=keep)
        history.append({"iteration": it, "loss": loss.item(), "ce": ce.item(), "local": local.item(),
                        "anatomical": anat.item(), "bank": class_bank.count})
    return history


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    history = train(args.iterations, args.batch, args.size, device=args.device)
    shown = sorted({*range(0, len(history), max(1, len(history) // 8)), len(history) - 1})
    for h in (history[i] for i in shown):
        print(f"iteration {h['iteration']:3d}  loss {h['loss']:.4f}  ce {h['ce']:.4f}  local {h['local']:.4f}  "
              f"anatomical {h['anatomical']:.4f}  bank rows {h['bank']}")
    return history


if __name__ == "__main__":
    main()
