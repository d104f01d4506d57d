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

    def decay_for(self, *, g_step: int, batch_size: int, images_seen: int) -> float:
        """The EMA interface the training step calls (shared with EMAHalfLife)."""
        return self.decay_at(g_step)


@torch.no_grad()
def update_ema(G_ema: nn.Module, G: nn.Module, decay: float) -> None:
    """Blend parameters; copy buffers (BatchNorm statistics, spectral-norm vectors) outright."""
    for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)  # G may be fp16/bf16 (DeepSpeed)
    for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)


def ema_beta(*, batch_size: int, half_life_kimg: float, rampup: float | None, images_seen: int) -> float:
    """StyleGAN2-ADA's G_ema decay for one G step of `batch_size` images (global batch).

    The EMA halves the weight of old values every half_life_kimg * 1000 images; with a ramp-up the
    half-life is at most rampup * images_seen (images shown before this step), so early on G_ema
    follows G closely (beta = 0 at the start: a plain copy).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not half_life_kimg > 0:
        raise ValueError(f"half_life_kimg={half_life_kimg} must be > 0")
    if rampup is not None and not rampup > 0:
        raise ValueError(f"rampup={rampup} must be > 0 or None")
    if images_seen < 0:
        raise ValueError(f"images_seen={images_seen} must be >= 0")
    half_life_images = half_life_kimg * 1000.0
    if rampup is not None:
        half_life_images = min(half_life_images, images_seen * rampup)
    # beta ** (half_life_images / batch_size) == 0.5: after one half-life the old weights count half.
    return 0.5 ** (batch_size / max(half_life_images, 1e-8))


@dataclass(frozen=True)
class EMAHalfLife:
    """G_ema decay from a half-life in kimg, as in StyleGAN2-ADA (use with update_ema).

    ADA's default half-life is batch * 10/32 kimg (10 at batch 32) with ramp-up 0.05; its CIFAR
    config uses 500 kimg and no ramp-up.
    """

    half_life_kimg: float = 10.0
    rampup: float | None = 0.05  # half-life <= rampup * images seen; None = no ramp-up

    def __post_init__(self) -> None:
        if not self.half_life_kimg > 0:
            raise ValueError(f"half_life_kimg={self.half_life_kimg} must be > 0")
        if self.rampup is not None and not self.rampup > 0:
            raise ValueError(f"rampup={self.rampup} must be > 0 or None")

    def beta(self, batch_size: int, images_seen: int) -> float:
        """Decay for a G step of `batch_size` images taken after `images_seen` images."""
        return ema_beta(
            batch_size=batch_size,
            half_life_kimg=self.half_life_kimg,
            rampup=self.rampup,
            images_seen=images_seen,
        )

    def decay_for(self, *, g_step: int, batch_size: int, images_seen: int) -> float:
        """The EMA interface the training step calls (shared with EMASchedule)."""
        return self.beta(batch_size, images_seen)
