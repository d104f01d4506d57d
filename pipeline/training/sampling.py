"""Latents, labels and image grids: sampling helpers shared by training, callbacks and benchmarks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LABEL_GROUPINGS = ("iid", "grouped")
LABEL_DISTRIBUTIONS = ("data", "uniform")


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


@dataclass(frozen=True)
class FakeLabels:
    """How the labels of generated batches are drawn (`model.fake_labels`).

    iid: every label independently. grouped: the global batch (all ranks together) is made of groups of
    `samples_per_class` labels of one class each, so that every class present has enough samples for
    per-class BatchNorm statistics (the last group is cut short when the batch is not a multiple). The
    group classes are drawn independently from `distribution`, the data's class frequencies or uniform,
    so over time every class appears at that rate. All ranks draw the same global labels from a shared
    seed and take their own slice, so the groups split consistently across ranks.
    """

    grouping: str = "iid"
    samples_per_class: int = 8
    distribution: str = "data"

    def __post_init__(self) -> None:
        if self.grouping not in LABEL_GROUPINGS:
            raise ValueError(f"model.fake_labels.grouping={self.grouping!r} is not one of {', '.join(LABEL_GROUPINGS)}")
        if self.distribution not in LABEL_DISTRIBUTIONS:
            raise ValueError(f"model.fake_labels.distribution={self.distribution!r} is not one of "
                             f"{', '.join(LABEL_DISTRIBUTIONS)}")
        if self.samples_per_class < 1:
            raise ValueError(f"model.fake_labels.samples_per_class must be >= 1, got {self.samples_per_class}")

    def probs(self, class_probs: torch.Tensor | None) -> torch.Tensor | None:
        if class_probs is None or class_probs.numel() == 0:
            return None
        return torch.ones_like(class_probs) if self.distribution == "uniform" else class_probs

    def draw(self, n: int, class_probs: torch.Tensor | None, *, rank: int, world: int, seed: int, index: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's n labels for the `index`-th draw; grouped draws are a function of (seed, index) only,
        so `seed` and `index` must be equal on every rank."""
        probs = self.probs(class_probs)
        if self.grouping == "iid" or probs is None:
            return sample_labels(n, probs, device=device)  # the rank's own RNG stream
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        total = n * world
        groups = -(-total // self.samples_per_class)
        classes = torch.multinomial(probs.cpu().float(), groups, replacement=True, generator=gen)
        labels = classes.repeat_interleave(self.samples_per_class)[:total]
        return labels[rank * n : (rank + 1) * n].to(device)


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
