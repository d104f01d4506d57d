"""StyleGAN2 synthesis network: learned constant, modulated convs with noise, toRGB skips (Karras et al. 2020)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.layers.fir import make_filter, upsample2d
from pipeline.layers.modulated_conv import ModulatedConv2d

NOISE_MODES = ("random", "const", "none")


class NoiseInjection(nn.Module):
    """x + strength * noise: per-pixel noise, one learned strength per channel, initialised to 0."""

    def __init__(self, *, channels: int, resolution: int) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(channels))
        self.register_buffer("const_noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: Tensor, mode: str) -> Tensor:
        if mode == "none":
            return x
        n, _, h, w = x.shape
        noise = self.const_noise if mode == "const" else torch.randn(n, 1, h, w, device=x.device, dtype=x.dtype)
        return torch.addcmul(x, noise, self.strength.view(1, -1, 1, 1))  # one pass, no (N, C, H, W) temporary


def synthesis_layer(in_channels: int, out_channels: int, *, w_dim: int, resolution: int, up: int,
                    resample_filter: list[float], conv_clamp: float | None) -> ModulatedConv2d:
    """3x3 modulated conv -> per-pixel noise -> bias + leaky ReLU (StyleGAN2 fig. 2d)."""
    return ModulatedConv2d(in_channels, out_channels, 3, w_dim=w_dim, up=up, resample_filter=resample_filter,
                           activation="lrelu", conv_clamp=conv_clamp,
                           noise=NoiseInjection(channels=out_channels, resolution=resolution))


class SynthesisBlock(nn.Module):
    """One resolution: [up-conv] conv, then toRGB added to the upsampled image of the previous block."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, img_channels: int,
                 resample_filter: list[float], conv_clamp: float | None, channels_last: bool = False) -> None:
        super().__init__()
        self.resolution = resolution
        # The layout of the activations that start from the constant; every later layer keeps it.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        first = in_channels == 0  # the 4x4 block starts from a learned constant
        if first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        convs = [] if first else [synthesis_layer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                                 resample_filter=resample_filter, conv_clamp=conv_clamp)]
        convs.append(synthesis_layer(out_channels, out_channels, w_dim=w_dim, resolution=resolution, up=1,
                                    resample_filter=resample_filter, conv_clamp=conv_clamp))
        self.convs = nn.ModuleList(convs)
        # toRGB: 1x1 modulated conv without demodulation (StyleGAN2 fig. 7)
        self.to_rgb = ModulatedConv2d(out_channels, img_channels, 1, w_dim=w_dim, demodulate=False,
                                      activation="linear", conv_clamp=conv_clamp)
        self.register_buffer("resample_filter", make_filter(resample_filter))
        self.num_ws = len(self.convs) + 1  # its convs, and toRGB (which shares its w with the next block's first conv)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str) -> tuple[Tensor, Tensor]:
        """ws: (N, num_ws, w_dim) for this block's layers."""
        if x is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1).contiguous(memory_format=self.memory_format)
        for i, conv in enumerate(self.convs):
            x = conv(x, ws[:, i], noise_mode=noise_mode)
        rgb = self.to_rgb(x, ws[:, len(self.convs)])
        img = rgb if img is None else upsample2d(img, self.resample_filter) + rgb
        return x, img


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> images (N, img_channels, R, R), not squashed (StyleGAN2 outputs are ~[-1, 1])."""

    def __init__(self, *, resolution: int, img_channels: int, w_dim: int, channel_base: int, channel_max: int,
                 resample_filter: list[float], conv_clamp: float | None, channels_last: bool = False) -> None:
        super().__init__()
        log2 = math.log2(resolution)
        if resolution < 8 or log2 != int(log2):
            raise ValueError(f"resolution {resolution} is not supported by StyleGAN2: use a power of 2 >= 8")
        self.resolutions = [2**i for i in range(2, int(log2) + 1)]
        blocks, prev = [], 0
        for res in self.resolutions:
            out = channels_at(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(prev, out, w_dim=w_dim, resolution=res, img_channels=img_channels,
                                         resample_filter=resample_filter, conv_clamp=conv_clamp,
                                         channels_last=channels_last))
            prev = out
        self.blocks = nn.ModuleList(blocks)
        # Consecutive blocks overlap by one w (toRGB of block b and first conv of block b+1).
        self.num_ws = sum(len(b.convs) for b in self.blocks) + 1

    def forward(self, ws: Tensor, noise_mode: str = "random") -> Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={noise_mode!r} must be one of {NOISE_MODES}")
        x = img = None
        idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, idx : idx + block.num_ws], noise_mode)
            idx += len(block.convs)
        return img
