"""Conditional batch normalisation (de Vries et al. 2017; Dumoulin et al. 2017) as used in BigGAN's G, with
per-class statistic isolation.

With `stats="pooled"` (BigGAN) the batch mean and variance pool every class in the batch, so a sample's
normalisation depends on the other classes beside it. With `stats="per_class"` each sample is normalised
with the mean and variance of the samples of its own class in the global batch: per-class sums are
all-reduced over the data-parallel ranks, and the gradient flows back through the statistics to every
rank's samples, as in SyncBatchNorm, grouped by class (`per_class_norm.PerClassNorm`). A class with
fewer than `min_count` samples in the global batch takes the fallback statistics (`fallback`): its
running per-class statistics (`running`; pooled running ones until the class has been seen with enough
samples) or the global batch's pooled statistics (`pooled`). Eval mode uses per-class running
statistics. Gains and biases are the same in both modes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.per_class_norm import PerClassNorm
from pipeline.layers.spectral import SNLayers

CBN_STATS = ("pooled", "per_class")
CBN_FALLBACKS = ("running", "pooled")


def check_cbn_options(stats: str, num_classes: int, min_count: int, fallback: str) -> None:
    """Config errors for the cBN statistics mode, naming the key that fixes them."""
    if stats not in CBN_STATS:
        raise ValueError(f"model.generator.cbn_stats={stats!r} is not one of {', '.join(CBN_STATS)}")
    if fallback not in CBN_FALLBACKS:
        raise ValueError(f"model.generator.cbn_fallback={fallback!r} is not one of {', '.join(CBN_FALLBACKS)}")
    if stats == "per_class" and num_classes <= 0:
        raise ValueError("model.generator.cbn_stats=per_class needs class labels (data.num_classes > 0); "
                         "use cbn_stats=pooled for an unconditional G")
    if min_count < 1:
        raise ValueError(f"model.generator.cbn_min_count must be >= 1, got {min_count}")


@dataclass(frozen=True)
class CBNOptions:
    """How a model's conditional BatchNorm layers take their statistics (`model.generator.cbn_*`)."""

    stats: str = "pooled"
    num_classes: int = 0
    min_count: int = 2
    fallback: str = "running"

    def kwargs(self) -> dict:
        """The ConditionalBatchNorm2d keyword arguments (which checks them)."""
        return asdict(self)


class ConditionalBatchNorm2d(nn.Module):
    """BN without affine, then a per-sample gain and bias predicted from a conditioning vector."""

    def __init__(
        self,
        num_features: int,
        cond_dim: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        layers: SNLayers = SNLayers(),
        stats: str = "pooled",
        num_classes: int = 0,
        min_count: int = 2,
        fallback: str = "running",
    ) -> None:
        super().__init__()
        check_cbn_options(stats, num_classes, min_count, fallback)
        self.num_features = num_features
        self.cond_dim = cond_dim
        self.eps = eps
        self.momentum = momentum  # None: cumulative average (standing statistics)
        self.stats, self.num_classes, self.min_count, self.fallback = stats, num_classes, min_count, fallback
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        if stats == "per_class":
            self.register_buffer("class_running_mean", torch.zeros(num_classes, num_features))
            self.register_buffer("class_running_var", torch.ones(num_classes, num_features))
            # Updates each class's running statistics received (0: never seen with min_count samples).
            self.register_buffer("class_updates", torch.zeros(num_classes, dtype=torch.long))
        self.batches_tracked = 0  # for momentum None (cumulative average of the pooled statistics)
        if cond_dim > 0:
            # BigGAN: gain = 1 + W_g c and bias = W_b c with SN'd, bias-free projections of
            # c = [shared class embedding, z chunk]; the "1 +" keeps the initial gain near one.
            self.to_gain = layers.linear(cond_dim, num_features, bias=False)
            self.to_bias = layers.linear(cond_dim, num_features, bias=False)
        else:
            # Nothing to condition on (unconditional, non-hierarchical G, or G's output BN): plain learned affine.
            self.gain = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    # ---- statistics ----------------------------------------------------------------------------
    def _pooled_momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        self.batches_tracked += 1
        return 1.0 / self.batches_tracked

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: Tensor, pooled_mean: Tensor, pooled_var: Tensor,
                        pixels: int) -> None:
        """Per-class running statistics for classes with at least min_count samples, and the pooled ones.

        Every rank computes the same all-reduced statistics, so the buffers stay equal across ranks.
        """
        elems = count * pixels  # values per class and channel
        unbias = (elems / (elems - 1).clamp_min(1))[:, None]  # Bessel's correction, as BatchNorm's running_var
        enough = count >= self.min_count
        self.class_updates += enough.long()
        if self.momentum is None:  # cumulative average over the updates of each class
            rate = (1.0 / self.class_updates.clamp_min(1).to(mean.dtype))[:, None]
        else:
            rate = torch.full_like(count, self.momentum)[:, None]
        rate = torch.where(enough[:, None], rate, torch.zeros_like(rate))
        self.class_running_mean.lerp_(mean.detach(), rate)
        self.class_running_var.lerp_(var.detach() * unbias, rate)
        m = self._pooled_momentum()
        total = count.sum() * pixels
        self.running_mean.lerp_(pooled_mean.detach(), m)
        self.running_var.lerp_(pooled_var.detach() * total / (total - 1).clamp_min(1), m)

    def _eval_moments(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Eval mode: each sample's class running mean and inverse std (N, C); pooled ones for unseen classes."""
        seen = (self.class_updates > 0)[:, None]
        mean = torch.where(seen, self.class_running_mean, self.running_mean)
        var = torch.where(seen, self.class_running_var, self.running_var)
        return mean[y], torch.rsqrt(var[y] + self.eps)

    # ---- forward -------------------------------------------------------------------------------
    def _affine(self, cond: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        """Gain and bias of shape (N, C)."""
        if self.cond_dim > 0:
            return 1.0 + self.to_gain(cond), self.to_bias(cond)
        return self.gain.expand(batch, -1), self.bias.expand(batch, -1)

    def forward(self, x: Tensor, cond: Tensor | None, y: Tensor | None) -> Tensor:
        """x: (N, C, H, W), cond: (N, cond_dim) or None when cond_dim == 0, y: (N,) labels -> (N, C, H, W)."""
        gain, bias = self._affine(cond, x.shape[0])
        if self.stats == "per_class":
            if y is None:
                raise ValueError("cbn_stats=per_class needs the class labels y in every forward")
            if self.training:  # statistics of the global batch, per class (pipeline/layers/per_class_norm.py)
                return PerClassNorm.apply(x, gain, bias, y, self)
            mean, inv_std = self._eval_moments(y)
            scale = gain * inv_std  # (N, C): normalisation and gain folded into one multiply-add per value
            return torch.addcmul((bias - mean * scale)[:, :, None, None], x, scale[:, :, None, None])
        momentum = self._pooled_momentum() if self.training else 0.0
        h = F.batch_norm(x, self.running_mean, self.running_var, weight=None, bias=None,
                         training=self.training, momentum=momentum, eps=self.eps)
        return h * gain[:, :, None, None] + bias[:, :, None, None]

    def extra_repr(self) -> str:
        extra = f", stats=per_class, min_count={self.min_count}, fallback={self.fallback}" if self.stats == "per_class" else ""
        return f"{self.num_features}, cond_dim={self.cond_dim}, eps={self.eps}, momentum={self.momentum}{extra}"
