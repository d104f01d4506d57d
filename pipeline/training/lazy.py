"""Lazy regularization (StyleGAN2, Karras et al. 2020, appendix B) and the R1 gamma heuristic."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LazyRegularization:
    """A penalty computed every `interval` steps only, scaled up by `interval` to keep its strength.

    StyleGAN2 runs R1 every 16 D steps and path length every 4 G steps. Because the regularization
    then gets its own optimizer step, Adam's lr and betas are adjusted with c = k / (k + 1) so that
    k + 1 steps together move about as far as k unregularized ones would. `weight == 0` turns the
    penalty off: never due, and Adam left unchanged.
    """

    interval: int = 16  # k: run on steps 0, k, 2k, ...
    weight: float = 1.0  # the penalty's own weight (gamma / 2 for R1, 2 for path length)

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval={self.interval!r} must be an int >= 1 (set weight=0 to turn it off)")
        if not self.weight >= 0.0:  # also rejects NaN
            raise ValueError(f"weight={self.weight} must be >= 0 (0 turns the regularization off)")

    @property
    def enabled(self) -> bool:
        """Whether the penalty runs at all."""
        return self.weight > 0.0

    @property
    def scale(self) -> float:
        """Multiplier of the raw penalty on the steps where it runs: weight * interval."""
        return self.weight * self.interval

    def due(self, step: int) -> bool:
        """Whether to regularize on `step` (0-based count of this network's optimizer steps)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return self.enabled and step % self.interval == 0

    def adjust_adam(self, lr: float, betas: tuple[float, float]) -> tuple[float, tuple[float, float]]:
        """Adam settings under lazy regularization: lr * c and betas ** c with c = k / (k + 1)."""
        if not self.enabled:
            return lr, betas
        c = self.interval / (self.interval + 1)
        beta1, beta2 = betas
        return lr * c, (beta1**c, beta2**c)


def r1_gamma_heuristic(resolution: int, batch_size: int) -> float:
    """StyleGAN2-ADA's starting R1 gamma, 0.0002 * resolution^2 / batch; tune by 2x-4x per dataset."""
    if resolution < 1 or batch_size < 1:
        raise ValueError(f"resolution={resolution} and batch_size={batch_size} must be >= 1")
    return 0.0002 * resolution**2 / batch_size
