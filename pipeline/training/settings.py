"""Run-level settings (`train.*` in conf/train.yaml): length, intervals, sampling."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    """Everything about a run that is neither the model, the data nor the objective.

    Lengths are in kimg: thousands of real images shown to D, summed over all ranks.
    """

    kimg: float = 100.0
    log_every_kimg: float = 1.0
    sample_every_kimg: float = 10.0
    ckpt_every_kimg: float = 25.0
    samples_per_class: int = 10  # columns of the sample grid; one row per class
    truncation: float | None = None  # None = plain N(0, I); else z resampled until |z| <= truncation (BigGAN)
    sample_seed: int = 123  # fixed latents for the sample grids
    keep_host_memory: bool = True  # glibc: freed tensor memory stays in the process (no page faults per step)
    standing_stats: int = 0  # > 0: sample grids from a copy of G_ema with BatchNorm statistics over this many batches
    preempt_grace_s: float = 60.0  # SIGTERM -> checkpoint -> exit; warn if that took longer (match the pods' grace)

    def __post_init__(self) -> None:
        for key in ("kimg", "log_every_kimg", "sample_every_kimg", "ckpt_every_kimg", "truncation", "preempt_grace_s"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be > 0")
        if self.standing_stats < 0:
            raise ValueError(f"train.standing_stats={self.standing_stats} must be >= 0 batches (0 turns it off)")
        if self.samples_per_class < 1:
            raise ValueError(f"train.samples_per_class={self.samples_per_class} must be >= 1")
