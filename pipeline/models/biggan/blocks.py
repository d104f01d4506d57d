"""Residual up/down blocks of BigGAN (Brock et al. 2019, fig. 15) and the shared arch checks."""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.conditional_norm import CBNOptions, ConditionalBatchNorm2d
from pipeline.layers.spectral import SNLayers


class GBlock(nn.Module):
    """cBN -> ReLU -> up 2x -> conv3x3 -> cBN -> ReLU -> conv3x3, plus skip = up 2x -> conv1x1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        cond_dim: int,
        bn_eps: float,
        layers: SNLayers,
        cbn: CBNOptions = CBNOptions(),
    ) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, cond_dim, eps=bn_eps, layers=layers, **cbn.kwargs())
        self.conv1 = layers.conv(in_channels, out_channels, 3)
        self.bn2 = ConditionalBatchNorm2d(out_channels, cond_dim, eps=bn_eps, layers=layers, **cbn.kwargs())
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        # Every G block upsamples, so the skip always needs its own 1x1 conv (BigGAN's learnable_sc).
        self.conv_sc = layers.conv(in_channels, out_channels, 1)

    def forward(self, x: Tensor, cond: Tensor | None, y: Tensor | None) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, 2H, 2W); cond conditions both cBNs."""
        h = F.relu(self.bn1(x, cond, y))
        h = self.conv1(F.interpolate(h, scale_factor=2, mode="nearest"))  # (N, C_out, 2H, 2W)
        h = self.conv2(F.relu(self.bn2(h, cond, y)))
        skip = self.conv_sc(F.interpolate(x, scale_factor=2, mode="nearest"))
        return h + skip


class DBlock(nn.Module):
    """[ReLU] -> conv3x3 -> ReLU -> conv3x3 -> [avgpool 2x], plus a (learnable) skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        downsample: bool,
        preactivation: bool,
        layers: SNLayers,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        # The first D block sees raw pixels: a ReLU there would discard the negative half of [-1, 1].
        self.preactivation = preactivation
        self.conv1 = layers.conv(in_channels, out_channels, 3)
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        self.learnable_sc = in_channels != out_channels or downsample
        self.conv_sc = layers.conv(in_channels, out_channels, 1) if self.learnable_sc else None

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.conv_sc is None:
            return x
        # Pre-activated blocks convolve before pooling; the first block pools first, which is
        # cheaper at full resolution and equivalent for a linear 1x1 conv (BigGAN-PyTorch order).
        if self.preactivation:
            x = self.conv_sc(x)
            return F.avg_pool2d(x, 2) if self.downsample else x
        x = F.avg_pool2d(x, 2) if self.downsample else x
        return self.conv_sc(x)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H/2, W/2) if downsample else (N, C_out, H, W)."""
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self._shortcut(x)


def check_attn_resolutions(attn_resolutions: Sequence[int], valid: Sequence[int]) -> tuple[int, ...]:
    """Return attn_resolutions as a sorted tuple, or raise if one is not a block output resolution."""
    attn = tuple(sorted({int(r) for r in attn_resolutions}))
    bad = [r for r in attn if r not in valid]
    if bad:
        raise ValueError(
            f"attn_resolutions {bad} are not block output resolutions of this network; "
            f"valid attn_resolutions: {sorted(set(valid))} (or empty for no attention)"
        )
    return attn
