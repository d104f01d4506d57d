"""StyleGAN2 mapping network: (z, class) -> w, with the running average of w used for truncation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.equalized import EqualizedLinear


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    """x / sqrt(mean(x^2)) per sample (StyleGAN's PixelNorm on latents)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z (N, z_dim) and labels (N,) -> ws (N, num_ws, w_dim).

    Conditioning as in StyleGAN2-ADA: the one-hot class goes through an embedding layer, both the
    embedding and z are normalised, concatenated, and mapped by `num_layers` leaky-ReLU layers whose
    learning rate is scaled by `lr_multiplier` (0.01: the mapping learns 100x slower than synthesis).
    """

    def __init__(self, *, z_dim: int, num_classes: int, w_dim: int, num_ws: int, num_layers: int = 8,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.995) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mapping_layers={num_layers} must be >= 1")
        self.z_dim, self.num_classes, self.w_dim, self.num_ws = z_dim, num_classes, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        self.embed = EqualizedLinear(num_classes, w_dim) if num_classes > 0 else None
        in_dim = z_dim + (w_dim if num_classes > 0 else 0)
        dims = [in_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            EqualizedLinear(a, b, activation="lrelu", lr_multiplier=lr_multiplier) for a, b in zip(dims, dims[1:])
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, y: Tensor | None = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> Tensor:
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            if y is None:
                raise ValueError(f"this mapping network is class-conditional (num_classes={self.num_classes}); pass y")
            c = self.embed(F.one_hot(y, self.num_classes).to(z.dtype))
            x = torch.cat([x, normalize_2nd_moment(c)], dim=1)
        for layer in self.layers:
            x = layer(x)  # (N, w_dim)
        if self.training:  # track E[w] for truncation (StyleGAN sec. 2 / appendix B)
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(0).to(self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)  # (N, num_ws, w_dim)
        if truncation_psi != 1.0:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)  # w' = w_avg + psi (w - w_avg)
        return ws
