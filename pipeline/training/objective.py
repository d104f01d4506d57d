"""The adversarial objective of one model family (`model.objective`): loss, D steps, regularizers."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.losses.adversarial import LOSSES
from pipeline.training.lazy import LazyRegularization


@dataclass(frozen=True)
class Objective:
    """What the GAN optimises, apart from the networks and the optimizers."""

    loss: str = "hinge"  # key of pipeline.losses.adversarial.LOSSES
    d_steps: int = 1  # D steps per G step (BigGAN: 2 on ImageNet, 4 on CIFAR)
    # The G step reuses the fakes of the D step just before it instead of drawing new latents. G has not
    # changed in between, so they are exactly the images a fresh forward of those latents would give,
    # and one G forward per G step is saved (the DCGAN recipe). Off = independent latents, as the papers.
    reuse_fakes: bool = False
    g_ortho: float = 0.0  # orthogonal regularization weight on G (BigGAN paper: 1e-4)
    d_ortho: float = 0.0
    ortho_variant: str = "offdiag"  # "offdiag" (BigGAN eq. 3) or "full" ||W W^T - I||^2
    r1_gamma: float = 0.0  # R1 on real images, gamma/2 * E||grad D(x)||^2 (0 = off; StyleGAN2: 0.0002 res^2 / batch)
    r1_interval: int = 16  # lazy: every k D steps, penalty x k (StyleGAN2 appendix B)
    pl_weight: float = 0.0  # path length regularization (StyleGAN2 sec. 3.2; 0 = off, paper: 2)
    pl_interval: int = 4
    pl_decay: float = 0.01  # running mean of path lengths
    pl_batch_shrink: int = 2  # the path-length pass uses batch // shrink samples

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {sorted(LOSSES)}")
        if self.d_steps < 1:
            raise ValueError(f"d_steps={self.d_steps} must be >= 1")
        if self.g_ortho < 0 or self.d_ortho < 0:
            raise ValueError("g_ortho and d_ortho must be >= 0")
        if self.ortho_variant not in ("offdiag", "full"):
            raise ValueError(f"ortho_variant={self.ortho_variant!r} must be 'offdiag' or 'full'")
        if self.r1_gamma < 0 or self.pl_weight < 0:
            raise ValueError("r1_gamma and pl_weight must be >= 0 (0 turns them off)")
        if self.pl_batch_shrink < 1:
            raise ValueError(f"pl_batch_shrink={self.pl_batch_shrink} must be >= 1")
        self.r1, self.pl  # validates the intervals

    @property
    def r1(self) -> LazyRegularization:
        return LazyRegularization(interval=self.r1_interval, weight=self.r1_gamma / 2)

    @property
    def pl(self) -> LazyRegularization:
        return LazyRegularization(interval=self.pl_interval, weight=self.pl_weight)
