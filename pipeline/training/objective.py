"""The adversarial objective of one model family (`model.objective`): loss, D steps, regularizers."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.losses.adversarial import LOSSES


@dataclass(frozen=True)
class Objective:
    """What the GAN optimises, apart from the networks and the optimizers."""

    loss: str = "hinge"  # key of pipeline.losses.adversarial.LOSSES
    d_steps: int = 1  # D steps per G step (BigGAN: 2 on ImageNet, 4 on CIFAR)
    g_ortho: float = 0.0  # orthogonal regularization weight on G (BigGAN paper: 1e-4)
    d_ortho: float = 0.0
    ortho_variant: str = "offdiag"  # "offdiag" (BigGAN eq. 3) or "full" ||W W^T - I||^2

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {sorted(LOSSES)}")
        if self.d_steps < 1:
            raise ValueError(f"d_steps={self.d_steps} must be >= 1")
        if self.g_ortho < 0 or self.d_ortho < 0:
            raise ValueError("g_ortho and d_ortho must be >= 0")
        if self.ortho_variant not in ("offdiag", "full"):
            raise ValueError(f"ortho_variant={self.ortho_variant!r} must be 'offdiag' or 'full'")
