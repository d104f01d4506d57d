"""Conditional StyleGAN2 generator: mapping -> synthesis, with style mixing and truncation."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pipeline.models.growth import Growable, check_growth_resolutions
from pipeline.models.stylegan2.ar_noise import check_noise_ar
from pipeline.models.stylegan2.mapping import MappingNetwork
from pipeline.models.stylegan2.synthesis import NOISE_MODES, SynthesisNetwork


class Generator(Growable):
    """G(z, y) -> images (N, C, r, r) at the active resolution r; `mapping` and `synthesis` are exposed for path
    length and truncation. Progressive growing uses the toRGB every synthesis block already has."""

    def __init__(self, *, resolution: int, channels: int, num_classes: int, z_dim: int = 512, w_dim: int = 512,
                 mapping_layers: int = 8, mapping_lr_multiplier: float = 0.01, w_avg_beta: float = 0.995,
                 channel_base: int = 32768, channel_max: int = 512, resample_filter: list[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, style_mixing_prob: float = 0.9, noise_mode: str = "random",
                 noise_ar: Mapping | None = None, channels_last: bool = False, num_fp16_res: int = 0,
                 growth_resolutions: list[int] | None = None) -> None:
        """noise_ar: {order, coefficients, learn} of the 2D AR noise that noise_mode=ar injects (ar_noise.py)."""
        super().__init__()
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"model.generator.noise_mode={noise_mode!r} must be one of {', '.join(NOISE_MODES)}")
        ar_spec = check_noise_ar(noise_ar)  # checked even when unused, so a typo fails early
        if not 0.0 <= style_mixing_prob <= 1.0:
            raise ValueError(f"style_mixing_prob={style_mixing_prob} must lie in [0, 1]")
        self.resolution, self.channels, self.num_classes, self.z_dim = resolution, channels, num_classes, z_dim
        self.style_mixing_prob, self.noise_mode = style_mixing_prob, noise_mode
        self.synthesis = SynthesisNetwork(resolution=resolution, img_channels=channels, w_dim=w_dim,
                                          channel_base=channel_base, channel_max=channel_max,
                                          resample_filter=list(resample_filter), conv_clamp=conv_clamp,
                                          channels_last=channels_last, num_fp16_res=num_fp16_res,
                                          noise_ar=ar_spec if noise_mode == "ar" else None)
        self.num_ws = self.synthesis.num_ws
        self.init_growth(check_growth_resolutions(growth_resolutions, resolution,
                                                  [r for r in self.synthesis.resolutions if r >= 8]), resample_filter)
        self.mapping = MappingNetwork(z_dim=z_dim, num_classes=num_classes, w_dim=w_dim, num_ws=self.num_ws,
                                      num_layers=mapping_layers, lr_multiplier=mapping_lr_multiplier,
                                      w_avg_beta=w_avg_beta)

    def mix_styles(self, ws: Tensor, z2: Tensor, y: Tensor | None) -> Tensor:
        """Style mixing regularization (StyleGAN sec. 3.1): layers from a random crossover on take w(z2).

        Coarse layers (before the crossover) keep the first latent's styles, fine layers take the second's.
        Each sample mixes with probability `style_mixing_prob`; otherwise its crossover is num_ws (no mixing).
        """
        n = ws.shape[0]
        cutoff = torch.randint(1, self.num_ws, (n,), device=ws.device)
        cutoff = torch.where(torch.rand(n, device=ws.device) < self.style_mixing_prob, cutoff,
                             torch.full_like(cutoff, self.num_ws))
        ws2 = self.mapping(z2, y)
        fine = torch.arange(self.num_ws, device=ws.device).view(1, -1) >= cutoff.view(-1, 1)  # (N, num_ws)
        return torch.where(fine.unsqueeze(-1), ws2, ws)

    def forward(self, z: Tensor, y: Tensor | None = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, return_ws: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        ws = self.mapping(z, y, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        if self.training and self.style_mixing_prob > 0:
            ws = self.mix_styles(ws, torch.randn_like(z), y)
        img = self.render(ws)
        return (img, ws) if return_ws else img

    def render(self, ws: Tensor) -> Tensor:
        """ws (N, num_ws, w_dim) -> images at the current growth stage: forward after the mapping (PPL in W uses it)."""
        img = self.synthesis(ws, noise_mode=self.noise_mode if self.training else "const",
                             resolution=self.active_resolution, alpha=self.alpha if self.fading else 1.0)
        return self.resize(img, self.output_resolution) if self.output_resolution else img
