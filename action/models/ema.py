"""EMA teacher: teacher = decay * teacher + (1 - decay) * student, one update per iteration, under no_grad.

The decay ramps as min(decay, 1 - 1 / (step + 1)) (the mean-teacher warm-up: early teachers follow the student
closely). Buffers (BatchNorm statistics) are copied. The teacher is a deep copy kept in eval mode, with
requires_grad off, so it never enters an optimizer or an autograd graph.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
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
            t.copy_(s)
        return alpha

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
