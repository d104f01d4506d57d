"""Separable FIR resampling as in StyleGAN/StyleGAN2 (Karras et al. 2019, 2020), in plain PyTorch.

Resampling without a low-pass filter aliases. Keeping every 2nd pixel folds every frequency above
the new Nyquist limit (0.25 cycles per original pixel) back onto a lower one, where it can no longer
be told apart from real content. Zero-insertion upsampling creates the mirror case: a copy of the
spectrum ("image") above the old Nyquist limit, seen as checkerboard and blocky artefacts. So a
low-pass FIR filter runs *before* decimation and *after* zero insertion (cf. Zhang 2019, "Making
convolutional networks shift-invariant again"). StyleGAN2 uses the binomial [1, 3, 3, 1] filter
(the bilinear kernel on a half-pixel grid) for both.

Every function takes a filter from `make_filter`: 2-D (kh, kw), or 1-D (k,) to be applied
separably (two 1-D passes instead of one 2-D pass, which is cheaper).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.layers.winograd import conv3x3


def make_filter(taps: Sequence[float], *, separable: bool = False) -> Tensor:
    """Normalised FIR filter: 2-D outer product of `taps` (or 1-D if separable), summing to 1."""
    f = torch.tensor([float(t) for t in taps], dtype=torch.float32)  # floats also accept Hydra ListConfigs
    if f.ndim != 1 or f.numel() == 0:
        raise ValueError(f"resample filter taps must be a non-empty 1-D list, got {taps!r}")
    f = f / f.sum()  # unit DC gain: a constant image stays the same constant
    return f if separable else torch.outer(f, f)  # (k,) or (k, k)


def _depthwise(x: Tensor, f: Tensor, gain: float, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """FIR convolution of every channel with `f`, zero-padded by pad = (py, px) on both sides."""
    c = x.shape[1]
    # F.conv2d computes a correlation; flipping makes it a true convolution (same for symmetric taps).
    f = f.to(x.dtype).flip(list(range(f.ndim)))
    if f.ndim == 2:
        weight = (f * gain)[None, None].expand(c, 1, -1, -1)  # (C, 1, kh, kw)
        return F.conv2d(x, weight, groups=c, padding=pad)
    # Separable: one horizontal and one vertical 1-D pass; the gain goes into the first pass.
    x = F.conv2d(x, (f * gain)[None, None, None, :].expand(c, 1, 1, -1), groups=c, padding=(0, pad[1]))
    return F.conv2d(x, f[None, None, :, None].expand(c, 1, -1, 1), groups=c, padding=(pad[0], 0))


def upfirdn2d(
    x: Tensor,
    f: Tensor,
    *,
    up: int = 1,
    down: int = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> Tensor:
    """Zero-insertion upsampling by `up`, pad (px0, px1, py0, py1; negative crops), FIR, keep every `down`-th pixel."""
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got up={up}, down={down}")
    n, c, h, w = x.shape
    if up > 1:
        # Place each input pixel at the top-left of an up x up cell of zeros: (N, C, H*up, W*up).
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    if px0 == px1 >= 0 and py0 == py1 >= 0:  # symmetric: the conv pads, saving a copy of the whole tensor
        x = _depthwise(x, f, gain, pad=(py0, px0))
    else:
        x = _depthwise(F.pad(x, padding), f, gain)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def _up_padding(taps: int, factor: int) -> tuple[int, int]:
    """Padding (before, after) of the zero-inserted signal so that the output is exactly in * factor."""
    # The valid conv shortens by taps - 1; the split centres the filter on the half-pixel grid, which for
    # [1, 3, 3, 1] and factor 2 gives out[2i] = (x[i-1] + 3 x[i]) / 4, out[2i+1] = (3 x[i] + x[i+1]) / 4.
    return (taps + factor - 1) // 2, (taps - factor) // 2


def _down_padding(taps: int, factor: int) -> tuple[int, int]:
    """Padding (before, after) so that FIR + decimation gives exactly in / factor for in divisible by factor."""
    # For [1, 3, 3, 1] and factor 2: out[m] = (x[2m-1] + 3 x[2m] + 3 x[2m+1] + x[2m+2]) / 8, centred between
    # the two input pixels that the output pixel covers.
    return (taps - factor + 1) // 2, (taps - factor) // 2


def upsample2d(x: Tensor, f: Tensor, *, factor: int = 2, gain: float | None = None) -> Tensor:
    """(N, C, H, W) -> (N, C, H*factor, W*factor): zero insertion, then the FIR low-pass removes the spectral images.

    gain=None uses factor**2: zero insertion keeps only 1 of factor**2 pixels, so the filter must sum to
    factor**2 for a constant image to stay the same constant (DC preserved).
    """
    p0, p1 = _up_padding(f.shape[-1], factor)
    gain = float(factor**2) if gain is None else gain
    return upfirdn2d(x, f, up=factor, padding=(p0, p1, p0, p1), gain=gain)


def downsample2d(x: Tensor, f: Tensor, *, factor: int = 2) -> Tensor:
    """(N, C, H, W) -> (N, C, H/factor, W/factor): low-pass first, so nothing above the new Nyquist aliases."""
    p0, p1 = _down_padding(f.shape[-1], factor)
    return upfirdn2d(x, f, down=factor, padding=(p0, p1, p0, p1))


def _transpose_weight(weight: Tensor, groups: int) -> Tensor:
    """Conv weight (O, I/g, k, k) -> the conv_transpose2d weight (I, O/g, k, k) computing the same correlation."""
    o, i_g, kh, kw = weight.shape
    w = weight.reshape(groups, o // groups, i_g, kh, kw).transpose(1, 2).reshape(groups * i_g, o // groups, kh, kw)
    # conv_transpose2d convolves (flipped kernel) where conv2d correlates: flip back.
    return w.flip([2, 3])


def conv2d_resample(
    x: Tensor, weight: Tensor, f: Tensor | None = None, *, up: int = 1, down: int = 1, groups: int = 1
) -> Tensor:
    """Same-padded conv (odd k) fused with FIR resampling: (N, I, H, W) -> (N, O, H*up/down, W*up/down).

    up > 1 equals `upsample2d` then a same-padded conv, and down > 1 equals a same-padded conv then
    `downsample2d`, except in the outer k // 2 output pixels, where the zero padding enters at another stage.
    """
    kh, kw = weight.shape[-2:]
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"conv2d_resample supports square kernels of odd size, got {kh}x{kw}")
    if up > 1 and down > 1:
        raise ValueError(f"use either up or down, got up={up}, down={down}")
    k = kh // 2  # the same-padding of the plain conv
    if up == 1 and down == 1:
        if kh == 3:
            return conv3x3(x, weight, groups=groups)  # Winograd on CPU for wide layers
        return F.conv2d(x, weight, padding=k, groups=groups)
    if f is None:
        raise ValueError("a resample filter (make_filter) is needed when up > 1 or down > 1")
    if down > 1:
        # StyleGAN2's D: blur, then a stride-`down` conv, which never computes the discarded outputs.
        # Padding = the downsample2d padding plus the conv's own same-padding.
        p0, p1 = _down_padding(f.shape[-1], down)
        x = upfirdn2d(x, f, padding=(p0 + k, p1 + k, p0 + k, p1 + k))
        return F.conv2d(x, weight, stride=down, groups=groups)
    # StyleGAN2's G: stride-`up` transposed conv (zero insertion fused with the conv, 1/up^2 of the
    # work of a conv at the output resolution), then the FIR removes the images. Its output is
    # (H-1)*up + kh long and already shifted by kh-1 relative to the reference composition, hence
    # the padding: the upsample2d padding minus k before, plus up-1-k after.
    x = F.conv_transpose2d(x, _transpose_weight(weight, groups), stride=up, groups=groups)
    p0, p1 = _up_padding(f.shape[-1], up)
    p0, p1 = p0 - k, p1 - k + up - 1
    return upfirdn2d(x, f, padding=(p0, p1, p0, p1), gain=float(up**2))
