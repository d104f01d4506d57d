"""Exponential moving average of the generator's weights (G_ema), as in BigGAN and StyleGAN2."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EMASchedule:
    """G_ema <- decay * G_ema + (1 - decay) * G, applied after each G step from `start_step` on.

    Before `start_step` G_ema is a plain copy of G (BigGAN-PyTorch starts averaging at iteration 20k
    on ImageNet and at 1000 on CIFAR).
    """

    decay: float = 0.999
    start_step: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay} must lie in [0, 1)")
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step} must be >= 0")

    def decay_at(self, g_step: int) -> float:
        """Decay to use after G step number `g_step` (0-based)."""
        return self.decay if g_step >= self.start_step else 0.0


@torch.no_grad()
def update_ema(G_ema: nn.Module, G: nn.Module, decay: float) -> None:
    """Blend parameters; copy buffers (BatchNorm statistics, spectral-norm vectors) outright."""
    for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)
