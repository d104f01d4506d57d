"""Conditional batch normalisation (de Vries et al. 2017; Dumoulin et al. 2017) as used in BigGAN's G."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.spectral import SNLayers


class ConditionalBatchNorm2d(nn.Module):
    """BN without affine, then a per-sample gain and bias predicted from a conditioning vector."""

    def __init__(
        self,
        num_features: int,
        cond_dim: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        layers: SNLayers = SNLayers(),
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.cond_dim = cond_dim
        self.eps = eps
        self.momentum = momentum
        # Own buffers rather than nn.BatchNorm2d so that other statistics modes (e.g. per-class
        # statistics) can share them and only `_normalize` changes.
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        if cond_dim > 0:
            # BigGAN: gain = 1 + W_g c and bias = W_b c with SN'd, bias-free projections of
            # c = [shared class embedding, z chunk]; the "1 +" keeps the initial gain near one.
            self.to_gain = layers.linear(cond_dim, num_features, bias=False)
            self.to_bias = layers.linear(cond_dim, num_features, bias=False)
        else:
            # Nothing to condition on (unconditional, non-hierarchical G): plain learned affine.
            self.gain = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def _normalize(self, x: Tensor, y: Tensor | None) -> Tensor:
        """Batch statistics in training (updating the running ones), running statistics in eval."""
        # y (class labels) is unused here; a per-class statistics mode will use it.
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            weight=None,
            bias=None,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )

    def _affine(self, cond: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        """Gain and bias of shape (N, C, 1, 1)."""
        if self.cond_dim > 0:
            gain = 1.0 + self.to_gain(cond)  # (N, C)
            bias = self.to_bias(cond)  # (N, C)
        else:
            gain = self.gain.expand(batch, -1)
            bias = self.bias.expand(batch, -1)
        return gain[:, :, None, None], bias[:, :, None, None]

    def forward(self, x: Tensor, cond: Tensor | None, y: Tensor | None) -> Tensor:
        """x: (N, C, H, W), cond: (N, cond_dim) or None when cond_dim == 0, y: (N,) labels -> (N, C, H, W)."""
        gain, bias = self._affine(cond, x.shape[0])
        return self._normalize(x, y) * gain + bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, cond_dim={self.cond_dim}, eps={self.eps}, momentum={self.momentum}"
