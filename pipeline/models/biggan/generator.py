"""BigGAN generator (Brock et al. 2019): shared class embedding, hierarchical z, residual up-blocks."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.attention import SelfAttention
from pipeline.layers.conditional_norm import CBNOptions, ConditionalBatchNorm2d
from pipeline.layers.spectral import SNLayers, init_weights
from pipeline.models.biggan.blocks import GBlock, check_attn_resolutions
from pipeline.models.growth import Growable, check_growth_resolutions

# Block output widths in multiples of `ch`, keyed by the number of up-blocks
# k = log2(resolution / bottom_width). Input widths are (out[0],) + out[:-1]. With bottom_width 4,
# k = 3..7 are BigGAN-PyTorch's tables for 32..512; k = 1, 2 extend the CIFAR-style table down.
G_WIDTHS: dict[int, tuple[int, ...]] = {
    1: (4,),
    2: (4, 4),
    3: (4, 4, 4),
    4: (16, 8, 4, 2),
    5: (16, 8, 4, 2, 1),
    6: (16, 8, 8, 4, 2, 1),
    7: (16, 8, 8, 4, 2, 1, 1),
}


def num_up_blocks(resolution: int, bottom_width: int) -> int:
    """Number of 2x up-blocks from bottom_width to resolution, or ValueError if there is no table."""
    by_resolution = {bottom_width * 2**k: k for k in G_WIDTHS}
    if resolution not in by_resolution:
        raise ValueError(
            f"Generator resolution {resolution} is not supported with bottom_width {bottom_width}; "
            f"supported resolution values: {sorted(by_resolution)}"
        )
    return by_resolution[resolution]


class Generator(Growable):
    """G(z, y) -> image in [-1, 1]; num_classes == 0 makes it unconditional.

    growth_resolutions (progressive growing): each block output resolution listed gets its own toRGB head
    (BN -> ReLU -> conv3x3 -> tanh, like the final one). At active resolution r with alpha < 1 the output is
    (1 - alpha) * upsample(toRGB_{r/2}) + alpha * toRGB_r; blocks above r do not run.
    """

    def __init__(
        self,
        *,
        resolution: int,
        channels: int,
        num_classes: int,
        z_dim: int = 120,
        ch: int = 64,
        shared_dim: int = 128,
        hier: bool = True,
        bottom_width: int = 4,
        attn_resolutions: Sequence[int] = (64,),
        sn_iters: int = 1,
        sn_eps: float = 1e-6,
        bn_eps: float = 1e-5,
        init: str = "ortho",
        cbn_stats: str = "pooled",
        cbn_min_count: int = 2,
        cbn_fallback: str = "running",
        growth_resolutions: Sequence[int] | None = None,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        num_blocks = num_up_blocks(resolution, bottom_width)
        out_widths = [ch * m for m in G_WIDTHS[num_blocks]]
        in_widths = [out_widths[0]] + out_widths[:-1]
        block_resolutions = [bottom_width * 2 ** (i + 1) for i in range(num_blocks)]
        attn = check_attn_resolutions(attn_resolutions, block_resolutions)
        self.init_growth(check_growth_resolutions(growth_resolutions, resolution, block_resolutions), resample_filter)
        self.block_resolutions = block_resolutions
        # Hierarchical z (BigGAN sec. 4 / fig. 15): one chunk for the input linear, one per block.
        if hier and z_dim % (num_blocks + 1) != 0:
            raise ValueError(
                f"z_dim={z_dim} must be divisible by num_blocks + 1 = {num_blocks + 1} for hierarchical "
                f"latents at resolution {resolution}; choose z_dim as a multiple of {num_blocks + 1} or hier=False"
            )

        self.resolution = resolution
        self.channels = channels
        self.num_classes = num_classes
        self.z_dim = z_dim
        self.hier = hier
        self.bottom_width = bottom_width
        self.z_chunk = z_dim // (num_blocks + 1) if hier else 0
        layers = SNLayers(n_power_iterations=sn_iters, eps=sn_eps, init=init)
        # pooled: BigGAN's batch statistics over all classes; per_class: each sample normalised with its
        # own class's statistics over the global batch (pipeline.layers.conditional_norm).
        cbn = CBNOptions(stats=cbn_stats, num_classes=num_classes, min_count=cbn_min_count, fallback=cbn_fallback)
        self.per_class_stats = cbn_stats == "per_class"

        # One embedding shared by all cBN layers instead of one per layer (BigGAN sec. 4); not SN'd.
        self.shared = init_weights(nn.Embedding(num_classes, shared_dim), init) if num_classes > 0 else None
        cond_dim = (shared_dim if num_classes > 0 else 0) + self.z_chunk
        self.linear = layers.linear(self.z_chunk if hier else z_dim, in_widths[0] * bottom_width**2)
        self.blocks = nn.ModuleList(
            GBlock(c_in, c_out, cond_dim=cond_dim, bn_eps=bn_eps, layers=layers, cbn=cbn)
            for c_in, c_out in zip(in_widths, out_widths)
        )
        self.attn = nn.ModuleList(
            SelfAttention(c, layers=layers) if r in attn else nn.Identity()
            for c, r in zip(out_widths, block_resolutions)
        )
        # The output BN pools classes too, so per_class isolates it as well (a plain affine, no conditioning).
        make_bn = lambda c: (ConditionalBatchNorm2d(c, 0, eps=bn_eps, **cbn.kwargs())  # noqa: E731
                             if self.per_class_stats else nn.BatchNorm2d(c, eps=bn_eps))
        self.out_bn = make_bn(out_widths[-1])
        self.out_conv = layers.conv(out_widths[-1], channels, 3)
        # toRGB heads of the lower growth resolutions (none for a fixed schedule: the keys stay as they were).
        width_at = dict(zip(block_resolutions, out_widths))
        self.stage_bn = nn.ModuleDict({str(r): make_bn(width_at[r]) for r in self.growth_resolutions[:-1]})
        self.stage_conv = nn.ModuleDict({str(r): layers.conv(width_at[r], channels, 3)
                                         for r in self.growth_resolutions[:-1]})

    def _split_latent(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
        """z: (N, z_dim) -> input of the first linear and the cBN conditioning vector of each block."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (N, {self.z_dim}), got {tuple(z.shape)}")
        if self.shared is not None and y is None:
            raise ValueError(f"this Generator is class-conditional (num_classes={self.num_classes}); pass labels y")
        e = self.shared(y) if self.shared is not None else None  # (N, shared_dim)
        if not self.hier:
            return z, [e] * len(self.blocks)
        z0, *z_blocks = z.split(self.z_chunk, dim=1)  # each (N, z_chunk)
        conds = [zc if e is None else torch.cat([e, zc], dim=1) for zc in z_blocks]
        return z0, conds

    def _to_rgb(self, h: Tensor, y: Tensor | None, resolution: int) -> Tensor:
        """(N, C, r, r) features -> (N, channels, r, r) image in [-1, 1] through the head of resolution r."""
        final = resolution == self.resolution
        bn = self.out_bn if final else self.stage_bn[str(resolution)]
        conv = self.out_conv if final else self.stage_conv[str(resolution)]
        h = bn(h, None, y) if self.per_class_stats else bn(h)
        return torch.tanh(conv(F.relu(h)))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z: (N, z_dim), y: (N,) long labels (ignored if unconditional) -> (N, channels, r, r) at the active r."""
        z0, conds = self._split_latent(z, y)
        h = self.linear(z0).view(z.shape[0], -1, self.bottom_width, self.bottom_width)  # (N, C0, bw, bw)
        r, prev = self.active_resolution, None
        for block, attn, cond, res in zip(self.blocks, self.attn, conds, self.block_resolutions):
            h = attn(block(h, cond, y))  # (N, C_i, 2H, 2W)
            if res == r // 2 and self.fading:
                prev = h
            if res == r:
                break
        img = self._to_rgb(h, y, r)
        if prev is not None:  # fade-in: the previous stage's image, upsampled, blended out
            old = self.resize(self._to_rgb(prev, y, r // 2), r)
            img = torch.lerp(old.to(img.dtype), img, self.alpha)  # dtypes differ under autocast
        return self.resize(img, self.output_resolution) if self.output_resolution else img
