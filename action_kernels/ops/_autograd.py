"""What every op's autograd route shares: autocast switched off inside the ops, and the once-differentiable guard
of the fused kernels' backward passes.

Autocast: the ops compute in their inputs' (promoted) dtype with fp32 accumulation, so they give the same answer
inside and outside torch.autocast. Left on, autocast would turn the GEMMs of the chunked path into bf16 ones
whose (c, K) output the native CPU kernel reads as fp32 (garbage, then a segfault: issue 17), and the torch
reference's logits into bf16 ones.

Double backward: a fused backward (soft_contrastive_loss on chunked, triton, cuda) forms the student gradient from
a buffer of the forward pass and the key gradient in a kernel: neither is differentiable again. With
create_graph=True the first derivative is still exact; differentiating it raises (DelayedError) with the fix,
instead of returning a silently wrong second derivative.
"""
from __future__ import annotations

import contextlib

import torch


def no_autocast(device: torch.device):
    """Autocast off for tensors on `device` (a no-op context where autocast is off already, or where the device
    type has no autocast: meta tensors, for shape propagation)."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def once_differentiable(op: str, why: str, fix: str, grads: tuple, inputs: tuple = ()):
    """grads: the tensors (or None) a backward returns; inputs: the op's differentiable inputs (saved tensors).
    Under create_graph=True (grad mode on inside backward), returns the grads behind a node that raises (naming op,
    why and the fix) when differentiated again; otherwise unchanged. The node also takes the inputs, so that
    torch.autograd.grad(..., inputs) reaches it (and raises) instead of reporting them unused."""
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    linked = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not present:
        return grads
    msg = (f"{op} is once differentiable: {why}, so the gradient computed with create_graph=True cannot be "
           f"differentiated again (double backward, Hessian-vector products, gradient penalties). {fix}")
    wrapped = torch._C._functions.DelayedError(msg, len(present) + len(linked))(
        *[grads[i].detach().requires_grad_(True) for i in present], *linked)
    if isinstance(wrapped, torch.Tensor):
        wrapped = (wrapped,)
    wrapped = wrapped[:len(present)]
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)
