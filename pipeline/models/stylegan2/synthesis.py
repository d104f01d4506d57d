"""StyleGAN2 synthesis network: learned constant, modulated convs with noise, toRGB skips (Karras et al. 2020)."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from pipeline.layers.fir import make_filter, upsample2d
from pipeline.layers.modulated_conv import ModulatedConv2d
from pipeline.models.stylegan2.ar_noise import ARNoise, ARNoiseSpec

NOISE_MODES = ("random", "const", "none", "ar")


class NoiseInjection(nn.Module):
    """x + strength * noise: per-pixel noise, one learned strength per channel, initialised to 0.

    mode "ar" draws unit-variance 2D AR noise (ar_noise.py) from this layer's own AR module, built when
    `noise_ar` is given (model.generator.noise_mode=ar); the const buffer stays for eval either way.
    """

    def __init__(self, *, channels: int, resolution: int, noise_ar: ARNoiseSpec | None = None) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(channels))
        self.register_buffer("const_noise", torch.randn(1, 1, resolution, resolution))
        self.ar = ARNoise(noise_ar) if noise_ar is not None else None

    def forward(self, x: Tensor, mode: str) -> Tensor:
        if mode == "none":
            return x
        n, _, h, w = x.shape
        if mode == "ar":
            if self.ar is None:
                raise ValueError("noise_mode='ar' needs a G built with model.generator.noise_mode=ar")
            noise = self.ar(n, h, w, device=x.device)
        else:
            noise = self.const_noise if mode == "const" else torch.randn(n, 1, h, w, device=x.device, dtype=x.dtype)
        return torch.addcmul(x, noise.to(x.dtype), self.strength.to(x.dtype).view(1, -1, 1, 1))  # one pass, no temporary


def synthesis_layer(in_channels: int, out_channels: int, *, w_dim: int, resolution: int, up: int,
                    resample_filter: list[float], conv_clamp: float | None,
                    noise_ar: ARNoiseSpec | None = None) -> ModulatedConv2d:
    """3x3 modulated conv -> per-pixel noise -> bias + leaky ReLU (StyleGAN2 fig. 2d)."""
    return ModulatedConv2d(in_channels, out_channels, 3, w_dim=w_dim, up=up, resample_filter=resample_filter,
                           activation="lrelu", conv_clamp=conv_clamp,
                           noise=NoiseInjection(channels=out_channels, resolution=resolution, noise_ar=noise_ar))


def fp16_resolution(resolution: int, num_fp16_res: int, conv_clamp: float | None, key: str) -> float:
    """Lowest resolution that runs in fp16 when the `num_fp16_res` highest do (never 4x4, as NVlabs); inf for none."""
    if num_fp16_res < 0:
        raise ValueError(f"{key}.num_fp16_res={num_fp16_res} must be >= 0")
    if num_fp16_res == 0:
        return math.inf
    if conv_clamp is None:
        raise ValueError(f"{key}.num_fp16_res={num_fp16_res} needs {key}.conv_clamp (256, as NVlabs): the clamp "
                         "keeps fp16 activations from overflowing")
    return max(2 ** (int(math.log2(resolution)) + 1 - num_fp16_res), 8)


def fp16_autocast(enabled: bool, device_type: str) -> contextlib.AbstractContextManager[None]:
    """fp16 autocast for a block that runs in fp16; otherwise nothing (an outer autocast stays in force)."""
    return torch.autocast(device_type, dtype=torch.float16) if enabled else contextlib.nullcontext()


class SynthesisBlock(nn.Module):
    """One resolution: [up-conv] conv, then toRGB added to the upsampled image of the previous block."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, img_channels: int,
                 resample_filter: list[float], conv_clamp: float | None, channels_last: bool = False,
                 use_fp16: bool = False, noise_ar: ARNoiseSpec | None = None) -> None:
        super().__init__()
        self.resolution, self.use_fp16 = resolution, use_fp16
        # The layout of the activations that start from the constant; every later layer keeps it.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        first = in_channels == 0  # the 4x4 block starts from a learned constant
        if first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        convs = [] if first else [synthesis_layer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                                 resample_filter=resample_filter, conv_clamp=conv_clamp,
                                                 noise_ar=noise_ar)]
        convs.append(synthesis_layer(out_channels, out_channels, w_dim=w_dim, resolution=resolution, up=1,
                                    resample_filter=resample_filter, conv_clamp=conv_clamp, noise_ar=noise_ar))
        self.convs = nn.ModuleList(convs)
        # toRGB: 1x1 modulated conv without demodulation (StyleGAN2 fig. 7)
        self.to_rgb = ModulatedConv2d(out_channels, img_channels, 1, w_dim=w_dim, demodulate=False,
                                      activation="linear", conv_clamp=conv_clamp)
        self.register_buffer("resample_filter", make_filter(resample_filter))
        self.num_ws = len(self.convs) + 1  # its convs, and toRGB (which shares its w with the next block's first conv)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str,
                rgb_weight: float = 1.0) -> tuple[Tensor, Tensor]:
        """ws: (N, num_ws, w_dim) for this block's layers; rgb_weight < 1 fades this block's toRGB in."""
        if x is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1).contiguous(memory_format=self.memory_format)
        with fp16_autocast(self.use_fp16, ws.device.type):
            for i, conv in enumerate(self.convs):
                x = conv(x, ws[:, i], noise_mode=noise_mode)
            rgb = self.to_rgb(x, ws[:, len(self.convs)])
        rgb = rgb.float() if rgb_weight == 1.0 else rgb.float() * rgb_weight  # the image in fp32
        img = rgb if img is None else upsample2d(img, self.resample_filter) + rgb
        return x, img


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> images (N, img_channels, R, R), not squashed (StyleGAN2 outputs are ~[-1, 1])."""

    def __init__(self, *, resolution: int, img_channels: int, w_dim: int, channel_base: int, channel_max: int,
                 resample_filter: list[float], conv_clamp: float | None, channels_last: bool = False,
                 num_fp16_res: int = 0, noise_ar: ARNoiseSpec | None = None) -> None:
        """noise_ar: build per-layer AR noise modules (noise_mode "ar"); None: random/const/none only."""
        super().__init__()
        log2 = math.log2(resolution)
        if resolution < 8 or log2 != int(log2):
            raise ValueError(f"resolution {resolution} is not supported by StyleGAN2: use a power of 2 >= 8")
        self.resolutions = [2**i for i in range(2, int(log2) + 1)]
        lowest_fp16 = fp16_resolution(resolution, num_fp16_res, conv_clamp, "model.generator")
        blocks, prev = [], 0
        for res in self.resolutions:
            out = channels_at(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(prev, out, w_dim=w_dim, resolution=res, img_channels=img_channels,
                                         resample_filter=resample_filter, conv_clamp=conv_clamp,
                                         channels_last=channels_last, use_fp16=res >= lowest_fp16,
                                         noise_ar=noise_ar))
            prev = out
        self.blocks = nn.ModuleList(blocks)
        # Consecutive blocks overlap by one w (toRGB of block b and first conv of block b+1).
        self.num_ws = sum(len(b.convs) for b in self.blocks) + 1

    def forward(self, ws: Tensor, noise_mode: str = "random", *, resolution: int | None = None,
                alpha: float = 1.0) -> Tensor:
        """Images at `resolution` (default: the full one). The skip architecture makes the progressive fade
        (1 - alpha) * up(img_{r/2}) + alpha * (up(img_{r/2}) + rgb_r) = up(img_{r/2}) + alpha * rgb_r."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={noise_mode!r} must be one of {NOISE_MODES}")
        resolution = resolution or self.resolutions[-1]
        x = img = None
        idx = 0
        for block in self.blocks:
            weight = alpha if block.resolution == resolution else 1.0
            x, img = block(x, img, ws[:, idx : idx + block.num_ws], noise_mode, weight)
            idx += len(block.convs)
            if block.resolution == resolution:
                break
        return img
