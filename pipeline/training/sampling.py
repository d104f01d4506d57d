"""Latents, labels and image grids: sampling helpers shared by training, callbacks and benchmarks."""
from __future__ import annotations

import numpy as np
import torch


def truncated_normal(shape: tuple[int, ...], threshold: float | None, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, I) with every entry resampled until |z| <= threshold (BigGAN's truncation trick, sec. 3.1).

    threshold None means no truncation.
    """
    z = torch.randn(shape, generator=generator, device=device)
    if threshold is None:
        return z
    if threshold <= 0:
        raise ValueError(f"truncation threshold must be > 0, got {threshold}")
    while True:
        bad = z.abs() > threshold
        if not bad.any():
            return z
        z[bad] = torch.randn(int(bad.sum()), generator=generator, device=device)


def sample_labels(n: int, class_probs: torch.Tensor | None, *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Class labels for fake images, drawn from the data's class frequencies; zeros if unconditional."""
    if class_probs is None or class_probs.numel() == 0:
        return torch.zeros(n, dtype=torch.long, device=device)
    return torch.multinomial(class_probs, n, replacement=True, generator=generator).to(device)


def make_grid(images: torch.Tensor, nrow: int, *, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows*H', cols*W', 3) grid, `nrow` images per row.

    uint8 because wandb.Image casts floats to uint8 without rescaling (a [0,1] grid turns black).
    """
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        x = x.expand(n, 3, h, w)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()
