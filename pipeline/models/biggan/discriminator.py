"""BigGAN discriminator (Brock et al. 2019): residual down-blocks and a projection head."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.attention import SelfAttention
from pipeline.layers.spectral import SNLayers
from pipeline.models.biggan.blocks import DBlock, check_attn_resolutions
from pipeline.models.growth import Growable, check_growth_resolutions

# resolution -> (block output widths in multiples of `ch`, whether each block halves the resolution).
# 32..256 are BigGAN-PyTorch's D tables (512 its BigGAN-deep-sized one); block inputs are
# (image channels,) + out[:-1]. 8 and 16 follow the CIFAR table: one downsample, then full-width blocks.
D_ARCH: dict[int, tuple[tuple[int, ...], tuple[bool, ...]]] = {
    8: ((4, 4), (True, False)),
    16: ((4, 4, 4), (True, False, False)),
    32: ((4, 4, 4, 4), (True, True, False, False)),
    64: ((1, 2, 4, 8, 16), (True, True, True, True, False)),
    128: ((1, 2, 4, 8, 16, 16), (True,) * 5 + (False,)),
    256: ((1, 2, 4, 8, 8, 16, 16), (True,) * 6 + (False,)),
    512: ((1, 1, 2, 4, 8, 8, 16, 16), (True,) * 7 + (False,)),
}


class Discriminator(Growable):
    """D(x, y) -> one logit per image; num_classes == 0 drops the projection term.

    growth_resolutions (progressive growing): at active resolution r the image enters at the first block whose
    input is r, through a 1x1 fromRGB conv (the raw image at the full resolution, as before). During a
    fade-in that block's output is blended with fromRGB_{r/2} of the downsampled image:
    (1 - alpha) * fromRGB_{r/2}(down(x)) + alpha * block_r(fromRGB_r(x)).
    """

    def __init__(
        self,
        *,
        resolution: int,
        channels: int,
        num_classes: int,
        ch: int = 64,
        attn_resolutions: Sequence[int] = (64,),
        sn_iters: int = 1,
        sn_eps: float = 1e-6,
        init: str = "ortho",
        growth_resolutions: Sequence[int] | None = None,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        if resolution not in D_ARCH:
            raise ValueError(
                f"Discriminator resolution {resolution} is not supported; "
                f"supported resolution values: {sorted(D_ARCH)}"
            )
        multipliers, downsample = D_ARCH[resolution]
        out_widths = [ch * m for m in multipliers]
        in_widths = [channels] + out_widths[:-1]
        block_resolutions, block_inputs = [], []
        r = resolution
        for down in downsample:
            block_inputs.append(r)
            r = r // 2 if down else r
            block_resolutions.append(r)
        attn = check_attn_resolutions(attn_resolutions, block_resolutions)
        self.init_growth(check_growth_resolutions(growth_resolutions, resolution, block_inputs), resample_filter)
        self.entry = {r: block_inputs.index(r) for r in self.growth_resolutions}  # first block fed at r

        self.resolution = resolution
        self.channels = channels
        self.num_classes = num_classes
        layers = SNLayers(n_power_iterations=sn_iters, eps=sn_eps, init=init)

        self.blocks = nn.ModuleList(
            DBlock(c_in, c_out, downsample=down, preactivation=i > 0, layers=layers)
            for i, (c_in, c_out, down) in enumerate(zip(in_widths, out_widths, downsample))
        )
        # Attention after the first block that reaches each requested resolution (blocks that keep
        # the resolution would otherwise each get one).
        attn_after = {block_resolutions.index(r) for r in attn}
        self.attn = nn.ModuleList(
            SelfAttention(c, layers=layers) if i in attn_after else nn.Identity()
            for i, c in enumerate(out_widths)
        )
        # fromRGB of the lower growth resolutions (none for a fixed schedule: the keys stay as they were).
        self.stage_from_rgb = nn.ModuleDict({str(r): layers.conv(channels, in_widths[self.entry[r]], 1)
                                             for r in self.growth_resolutions[:-1]})
        self.linear = layers.linear(out_widths[-1], 1)
        # Projection discriminator (Miyato & Koyama 2018, eq. 3): logit += <embed(y), phi(x)>.
        self.embed = layers.embedding(num_classes, out_widths[-1]) if num_classes > 0 else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (N, channels, res, res), y: (N,) long labels (ignored if unconditional) -> logits (N,)."""
        if self.embed is not None and y is None:
            raise ValueError(f"this Discriminator is class-conditional (num_classes={self.num_classes}); pass labels y")
        r = self.active_resolution
        first = self.entry[r]
        h = x if r == self.resolution else self.stage_from_rgb[str(r)](x)
        for i, (block, attn) in enumerate(zip(self.blocks, self.attn)):
            if i < first:
                continue
            if self.fading and i == self.entry[r // 2]:  # the new layers' features, blended in
                old = self.stage_from_rgb[str(r // 2)](self.resize(x, r // 2))
                h = torch.lerp(old.to(h.dtype), h, self.alpha)  # dtypes differ under autocast
            h = attn(block(h))  # (N, C_i, H_i, W_i)
        # ReLU then global *sum* pooling, as BigGAN: phi(x) of the projection paper.
        h = F.relu(h).sum(dim=(2, 3))  # (N, C)
        out = self.linear(h).squeeze(1)  # (N,)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out
