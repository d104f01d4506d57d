"""StyleGAN2 discriminator (residual or plain) with minibatch stddev and projection conditioning (Karras et al. 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.equalized import EqualizedConv2d, EqualizedLinear
from pipeline.models.growth import Growable, check_growth_resolutions
from pipeline.models.stylegan2.mapping import normalize_2nd_moment
from pipeline.models.stylegan2.synthesis import channels_at, fp16_autocast, fp16_resolution


def minibatch_stddev(x: Tensor, group_size: int, num_channels: int = 1) -> Tensor:
    """Append the stddev of features over groups of samples (ProGAN sec. 3): D can see a lack of variety.

    x: (N, C, H, W) -> (N, C + num_channels, H, W). The group is the largest divisor of N <= group_size.
    """
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)
    # In fp32 at least: in fp16 the 1e-8 is 0 and the double backward of sqrt at small variances (R1) overflows.
    y = x.reshape(g, -1, num_channels, c // num_channels, h, w)  # (G, N/G, F, C/F, H, W)
    y = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # stddev over the group
    y = y.mean(dim=(2, 3, 4)).reshape(-1, num_channels, 1, 1).repeat(g, 1, h, w)  # (N, F, H, W)
    return torch.cat([x, y.to(x.dtype)], dim=1)


ARCHITECTURES = ("resnet", "orig")


class DBlock(nn.Module):
    """conv 3x3 -> conv 3x3 with FIR downsampling; "resnet" adds a 1x1 downsampling skip, the sum scaled by sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int, *, resample_filter: list[float],
                 conv_clamp: float | None, residual: bool = True) -> None:
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3, activation="lrelu", down=2,
                                     resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.skip = (EqualizedConv2d(in_channels, out_channels, 1, bias=False, down=2,
                                     resample_filter=resample_filter) if residual else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.skip is None:
            return self.conv1(self.conv0(x))
        gain = math.sqrt(0.5)  # keeps the variance of the residual sum equal to its parts'
        return self.skip(x, gain=gain) + self.conv1(self.conv0(x), gain=gain)


class Discriminator(Growable):
    """D(x, y) -> logits (N,). Conditioning: <features, cmap(y)> / sqrt(cmap_dim) (projection, ADA style).

    growth_resolutions (progressive growing): at active resolution r the image enters through fromRGB_r into the
    block at r; during a fade-in that block's output is blended with fromRGB_{r/2} of the downsampled image.
    """

    def __init__(self, *, resolution: int, channels: int, num_classes: int, channel_base: int = 32768,
                 channel_max: int = 512, mbstd_group_size: int = 4, mbstd_channels: int = 1,
                 cmap_dim: int | None = None, cmap_layers: int = 2, resample_filter: list[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, architecture: str = "resnet", channels_last: bool = False,
                 num_fp16_res: int = 0, growth_resolutions: list[int] | None = None) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r} must be one of {ARCHITECTURES} "
                             "(resnet: StyleGAN2's residual D; orig: plain conv stack, StyleGAN2-ADA's CIFAR setting)")
        log2 = math.log2(resolution)
        if resolution < 8 or log2 != int(log2):
            raise ValueError(f"resolution {resolution} is not supported by StyleGAN2: use a power of 2 >= 8")
        self.resolution, self.num_classes, self.mbstd_group_size = resolution, num_classes, mbstd_group_size
        self.mbstd_channels = mbstd_channels
        # Activation layout after fromRGB (an RGB or gray input is too thin for the layout to carry over).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        ch = lambda r: channels_at(r, channel_base, channel_max)  # noqa: E731
        self.from_rgb = EqualizedConv2d(channels, ch(resolution), 1, activation="lrelu", conv_clamp=conv_clamp)
        block_resolutions = [2**i for i in range(int(log2), 2, -1)]
        self.block_resolutions = block_resolutions
        self.init_growth(check_growth_resolutions(growth_resolutions, resolution, block_resolutions), resample_filter)
        # fromRGB of the lower growth resolutions (none for a fixed schedule: the keys stay as they were).
        self.stage_from_rgb = nn.ModuleDict({
            str(r): EqualizedConv2d(channels, ch(r), 1, activation="lrelu", conv_clamp=conv_clamp)
            for r in self.growth_resolutions[:-1]})
        self.blocks = nn.ModuleList(
            DBlock(ch(r), ch(r // 2), resample_filter=list(resample_filter), conv_clamp=conv_clamp,
                   residual=architecture == "resnet")
            for r in block_resolutions
        )
        # The num_fp16_res highest resolutions (fromRGB and their blocks) run in fp16; the 4x4 epilogue never does.
        lowest_fp16 = fp16_resolution(resolution, num_fp16_res, conv_clamp, "model.discriminator")
        self.fp16_blocks = [r >= lowest_fp16 for r in block_resolutions]
        self.num_fp16_res, self.fp16_from_rgb = num_fp16_res, resolution >= lowest_fp16
        c4 = ch(4)
        self.conv = EqualizedConv2d(c4 + mbstd_channels, c4, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(c4 * 16, c4, activation="lrelu")
        self.cmap_dim = (cmap_dim or c4) if num_classes > 0 else 0
        self.out = EqualizedLinear(c4, self.cmap_dim or 1)
        if num_classes > 0:  # a small embedding network maps the class to the projection vector
            dims = [self.cmap_dim] * (cmap_layers + 1)
            self.embed = EqualizedLinear(num_classes, self.cmap_dim)
            self.cmap = nn.ModuleList(EqualizedLinear(a, b, activation="lrelu") for a, b in zip(dims, dims[1:]))

    def _from_rgb(self, x: Tensor, resolution: int) -> Tensor:
        """Image (N, C, r, r) -> features (N, C_r, r, r) through the fromRGB of resolution r."""
        layer = self.from_rgb if resolution == self.resolution else self.stage_from_rgb[str(resolution)]
        use_fp16 = self.fp16_blocks[self.block_resolutions.index(resolution)] if self.num_fp16_res else False
        with fp16_autocast(use_fp16, x.device.type):
            return layer(x).contiguous(memory_format=self.memory_format)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        r = self.active_resolution
        h = self._from_rgb(x, r)  # (N, C_r, r, r)
        for res, block, use_fp16 in zip(self.block_resolutions, self.blocks, self.fp16_blocks, strict=True):
            if res > r:
                continue
            if self.fading and res == r // 2:  # the new layers' features, blended in
                h = torch.lerp(self._from_rgb(self.resize(x, res), res).to(h.dtype), h, self.alpha)
            if not use_fp16 and self.num_fp16_res:
                h = h.float()  # fp32 from the last fp16 block on
            with fp16_autocast(use_fp16, x.device.type):
                h = block(h)  # halves the resolution down to 4x4
        if self.num_fp16_res:
            h = h.float()
        h = minibatch_stddev(h, self.mbstd_group_size, self.mbstd_channels)
        h = self.fc(self.conv(h).flatten(1))  # (N, C_4)
        out = self.out(h)  # (N, cmap_dim) or (N, 1)
        if self.num_classes == 0:
            return out.squeeze(1)
        if y is None:
            raise ValueError(f"this Discriminator is class-conditional (num_classes={self.num_classes}); pass y")
        c = normalize_2nd_moment(self.embed(F.one_hot(y, self.num_classes).to(x.dtype)))
        for layer in self.cmap:
            c = layer(c)
        return (out * c).sum(dim=1) / math.sqrt(self.cmap_dim)
