"""The non-finite guard of Trainer.step: nothing of a run's state changes in an iteration that produced NaN/inf.

The step snapshots the model's buffers before its first forward (snapshot_buffers); after each shard's forward it
checks the loss terms (non_finite_losses), after the backward the gradients (non_finite_gradients). On a finding
the trainer puts the buffers back (restore_buffers: BatchNorm running statistics), drops gradients and deferred
bank updates, saves the state before the iteration when it is finite (model_is_finite; else the last checkpoint is
kept) and raises non_finite_error: FloatingPointError naming the iteration, the terms or parameters, and the batch's
files (describe_batch). The optimizer, scheduler, scaler, EMA teacher and banks are then those before the iteration.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's buffers (BatchNorm running statistics and counters) before the step's forwards."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    """Puts back the buffers snapshot_buffers copied."""
    with torch.no_grad():
        for b, b0 in zip(model.buffers(), saved):
            b.copy_(b0)


def non_finite_losses(values: dict[str, float]) -> str | None:
    """What is wrong with a shard's loss values ({term: value}), or None when every term is finite."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    return f"loss term(s) {list(bad)} not finite ({bad})" if bad else None


def non_finite_gradients(model: nn.Module) -> str | None:
    """Which parameters' gradients hold NaN/inf (after finite loss terms), or None when none does."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    norms = torch._foreach_norm([g for _, g in named], float("inf"))  # max |g|: NaN and inf propagate
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return None
    bad = [n for (n, _), v in zip(named, norms) if not bool(torch.isfinite(v))]
    return (f"gradient not finite in {len(bad)} parameter(s) (first: {', '.join(bad[:3])}); every loss term was "
            f"finite")


def model_is_finite(model: nn.Module) -> bool:
    """Every floating-point entry of the model's state dict (parameters and buffers) is finite."""
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def describe_batch(data, indices: tuple[torch.Tensor, torch.Tensor], views: dict) -> str:
    """The files of a batch (indices: its labelled and unlabelled indices into `data`, a SliceData / VolumeData),
    those of its images that hold NaN/inf, and the prepared views that do (augmentation, teacher outputs)."""
    lab, unl = (i.tolist() for i in indices)
    sources = [("labelled", lab, getattr(data, "names", None), data.images),
               ("unlabelled", unl, getattr(data, "unlabelled_names", None), data.unlabelled)]
    parts, bad = [], []
    for kind, picked, names, images in sources:
        if not picked:
            continue
        shown = [names[i] for i in picked] if names else [f"#{i}" for i in picked]
        parts.append(f"{kind} {shown}")
        bad += [shown[j] for j, i in enumerate(picked) if not bool(torch.isfinite(images[i]).all())]
    text = "batch files: " + "; ".join(parts)
    text += f"; non-finite input images: {bad}" if bad else "; every input image is finite"
    views_bad = [k for k, v in views.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                 and not bool(torch.isfinite(v).all())]
    if views_bad:
        text += f"; non-finite prepared views: {views_bad}"
    return text


def non_finite_error(t: int, what: str, batch: str, saved: str | None, out: str) -> FloatingPointError:
    """The error that stops a run at iteration t: `what` was not finite in `batch` (describe_batch); saved: the
    checkpoint that now holds the state before the iteration, or None when that state was not finite either (the
    run folder's last.pt is then kept as it was)."""
    kept = (f"the state before this iteration is saved in {saved}" if saved is not None else
            f"the model was already non-finite before this iteration, so {os.path.join(out, 'last.pt')} is kept as "
            f"it was")
    return FloatingPointError(f"iteration {t}: {what}; {batch}; training stopped, nothing of this iteration "
                              f"applied: {kept}")
