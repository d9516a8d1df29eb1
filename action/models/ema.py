"""EMA teacher: teacher = decay * teacher + (1 - decay) * student, one update per iteration, under no_grad.

The decay ramps as min(decay, 1 - 1 / (step + 1)) (the mean-teacher warm-up: early teachers follow the student
closely). Floating-point buffers (BatchNorm running statistics) are copied from the student at every update
(buffers="copy"), or averaged like the weights (buffers="ema": statistics that lag with the weights they go with,
and, being a function of the student's, the same whatever the number of processes or shards); integer buffers
(BatchNorm's counters) are copied. The teacher is a deep copy kept in eval mode, with requires_grad off, so it
never enters an optimizer or an autograd graph.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, decay: float = 0.99, buffers: str = "copy"):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if buffers not in ("copy", "ema"):
            raise ValueError(f"buffers must be 'copy' or 'ema', got {buffers!r}")
        self.decay, self.buffers_mode = decay, buffers
        self.module = copy.deepcopy(student)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the teacher stays in eval mode (pseudo-labels, targets)
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """One EMA step towards `student` at iteration `step` (0-based); returns the decay used."""
        alpha = min(self.decay, 1.0 - 1.0 / (step + 1))
        for t, s in zip(self.module.parameters(), student.parameters()):
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        for t, s in zip(self.module.buffers(), student.buffers()):
            if self.buffers_mode == "ema" and t.is_floating_point():
                t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
            else:
                t.copy_(s)
        return alpha

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class batch_statistics:
    """Context manager: inside it, every BatchNorm of `module` normalises with the statistics of the batch it sees
    (as in train mode) while its running statistics and counters stay exactly as they were; dropout and every
    other layer keep their mode. For teacher forwards (the ReCo and ACTION code run their EMA model in train
    mode)."""

    def __init__(self, module: nn.Module):
        from torch.nn.modules.batchnorm import _BatchNorm

        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]

    def __enter__(self):
        self.saved = [(m.training, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in self.norms]
        for m in self.norms:
            m.train()
        return self

    def __exit__(self, *exc):
        for m, (training, buffers) in zip(self.norms, self.saved):
            m.train(training)
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        return False
