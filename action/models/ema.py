"""EMA teacher: teacher = decay * teacher + (1 - decay) * student, one update per iteration, under no_grad.

The decay ramps as min(decay, 1 - 1 / (step + 1)) (the mean-teacher warm-up: early teachers follow the student
closely). Buffers (BatchNorm statistics) are copied from the student at every update (copy_buffers=True), or are the
teacher's own (copy_buffers=False: its forwards under batch_statistics(track=True) keep them, so they describe the
teacher's weights, not the student's). The teacher is a deep copy kept in eval mode, with requires_grad off, so it
never enters an optimizer or an autograd graph.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, decay: float = 0.99, copy_buffers: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.copy_buffers = decay, copy_buffers
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
        if self.copy_buffers:
            for t, s in zip(self.module.buffers(), student.buffers()):
                t.copy_(s)
        return alpha

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class batch_statistics:
    """Context manager: inside it, every BatchNorm of `module` normalises with the statistics of the batch it sees
    (as in train mode); dropout and every other layer keep their mode. track=False: the running statistics and
    counters stay exactly as they were; track=True: they are updated as in train mode (an EMA teacher's own
    statistics, EMATeacher(copy_buffers=False)). For teacher forwards (the ReCo and ACTION code run their EMA
    model in train mode)."""

    def __init__(self, module: nn.Module, track: bool = False):
        from torch.nn.modules.batchnorm import _BatchNorm

        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        self.track = track

    def __enter__(self):
        self.saved = [(m.training, None if self.track else {k: b.clone() for k, b in m.named_buffers(recurse=False)})
                      for m in self.norms]
        for m in self.norms:
            m.train()
        return self

    def __exit__(self, *exc):
        for m, (training, buffers) in zip(self.norms, self.saved):
            m.train(training)
            for k, b in (buffers or {}).items():
                getattr(m, k).copy_(b)
        return False
