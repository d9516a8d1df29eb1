"""No silent NaN model: a checkpoint's tensors (weights, BatchNorm statistics, optimizer and teacher state) are checked
to be finite before evaluate, predict, --init or --resume use them, and a model used for inference is checked to
produce finite outputs (refuse_non_finite_outputs). A NaN weight otherwise gives NaN logits everywhere, which argmax
turns into all-background predictions and Dice 0 with rc 0."""
from __future__ import annotations

import torch
from torch import nn


def non_finite_tensors(tree, prefix: str = "") -> list[str]:
    """The dotted names of the floating-point tensors of `tree` (a tensor, or dicts / lists / tuples of them, e.g. a
    state dict or a checkpoint) that hold a NaN or an infinity."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() or tree.is_complex()
        return [prefix or "tensor"] if bad and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = []
    for key, value in items:
        out += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def check_finite(tree, source: str) -> None:
    """ValueError naming `source` (e.g. "--checkpoint runs/x/best.pt") and its non-finite tensors, when any."""
    bad = non_finite_tensors(tree)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values ({shown}); the model it holds "
                         f"cannot give meaningful outputs: use an earlier checkpoint of the run")


class NonFiniteOutput(ValueError):
    """A model produced NaN or infinite outputs from a finite input."""


def refuse_non_finite_outputs(model: nn.Module, source: str) -> nn.Module:
    """Registers a forward hook on `model` that raises NonFiniteOutput (naming `source`) when an output of a forward
    with finite inputs holds NaN or an infinity (finite weights can still overflow); returns the model."""

    def hook(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if tensors and not all(bool(torch.isfinite(t).all()) for t in tensors) and all(
                bool(torch.isfinite(x).all()) for x in inputs if isinstance(x, torch.Tensor)):
            count = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
            raise NonFiniteOutput(f"{source}: the model's output holds {count} NaN or infinite value(s) for a finite "
                                  f"input (its weights are finite, but its activations overflow); its predictions "
                                  f"would be meaningless: use an earlier checkpoint of the run")

    model.register_forward_hook(hook)
    return model
