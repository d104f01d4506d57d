"""The growth state every progressively grown network shares: the active resolution, alpha, and its resampling.

Networks build every layer up front (PGGAN sec. 3) and run only those of the active resolution; during a
fade-in the newest layers are blended in with weight alpha. The state is plain attributes, not buffers:
it is a function of the images shown (pipeline.training.progressive), set by the GAN module before every
step and recorded in checkpoints apart from the weights.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.layers.fir import downsample2d, make_filter, upsample2d


def check_growth_resolutions(resolutions: Sequence[int] | None, resolution: int, supported: Sequence[int]
                             ) -> list[int]:
    """The resolutions a network grows through (`resolution` alone if None); the last must be `resolution`."""
    res = [resolution] if resolutions is None else [int(r) for r in resolutions]
    if not res or res[-1] != resolution:
        raise ValueError(f"growth_resolutions={res} must end at the network's resolution {resolution}: "
                         f"schedule.resolutions must end at data.resolution={resolution}")
    bad = [r for r in res if r not in supported]
    if bad:
        raise ValueError(f"growth_resolutions {bad} cannot be grown through by this network; supported stage "
                         f"resolutions: {sorted(set(supported))} (set schedule.resolutions)")
    return res


def resize(x: Tensor, resolution: int, f: Tensor) -> Tensor:
    """(N, C, R, R) -> (N, C, resolution, resolution) by repeated 2x FIR down- or upsampling with filter `f`."""
    while x.shape[-1] > resolution:
        x = downsample2d(x, f)
    while x.shape[-1] < resolution:
        x = upsample2d(x, f)
    return x


class Growable(nn.Module):
    """Mixin: `set_growth(resolution, alpha)`; `resize` with the network's anti-aliased filter."""

    def init_growth(self, resolutions: list[int], resample_filter: Sequence[float]) -> None:
        self.growth_resolutions = resolutions
        self.active_resolution, self.alpha = resolutions[-1], 1.0
        self.output_resolution: int | None = None  # G: upsample outputs to this (evaluation at the final size)
        # Not persistent: it is a constant of the config, and checkpoints of fixed runs keep their keys.
        self.register_buffer("growth_filter", make_filter(resample_filter), persistent=False)

    def set_growth(self, resolution: int, alpha: float = 1.0, *, output_resolution: int | None = None) -> None:
        """Run at `resolution`, its newest layers weighted by `alpha` (1 = fully in)."""
        if resolution not in self.growth_resolutions:
            raise ValueError(f"resolution {resolution} is not one of this network's growth_resolutions "
                             f"{self.growth_resolutions}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1]")
        self.active_resolution, self.alpha, self.output_resolution = resolution, float(alpha), output_resolution

    @property
    def fading(self) -> bool:
        """Whether the previous resolution's path still contributes (a stage after the first, alpha < 1)."""
        return self.alpha < 1.0 and self.active_resolution != self.growth_resolutions[0]

    def resize(self, x: Tensor, resolution: int | None = None) -> Tensor:
        """Images at any power-of-2 size -> `resolution` (default: the active one), anti-aliased."""
        return resize(x, resolution or self.active_resolution, self.growth_filter)
