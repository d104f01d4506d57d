"""Weight modulation and demodulation (StyleGAN2, Karras et al. 2020, sec. 2.2, eqs. 1 and 3)."""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.layers.equalized import ACTIVATION_GAINS, EqualizedLinear, bias_act, check_activation
from pipeline.layers.fir import conv2d_resample, make_filter


def demodulation_coefficients(weight: Tensor, styles: Tensor, *, eps: float = 1e-8) -> Tensor:
    """1 / sigma_j of eq. 3 for every sample: weight (O, I, k, k), styles (N, I) -> (N, O)."""
    # sum_{i,k} (s_i w_ijk)^2 = sum_i s_i^2 (sum_k w_ijk^2): one (N, I) x (I, O) matmul instead of
    # materialising the N modulated kernels.
    return (styles.square() @ weight.square().sum(dim=(2, 3)).T + eps).rsqrt()


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    *,
    demodulate: bool = True,
    up: int = 1,
    resample_filter: Tensor | None = None,
    fused: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Per-sample modulated same-padded conv: x (N, I, H, W), weight (O, I, k, k), styles (N, I) -> (N, O, H*up, W*up).

    fused=True builds the N modulated kernels and runs ONE grouped conv (one group per sample).
    fused=False scales the input by s, runs one ordinary conv with the shared weight and scales the
    output by 1/sigma: the same numbers, since conv is linear in both x and w. up > 1 needs
    `resample_filter` (make_filter) and upsamples as `conv2d_resample` does: transposed conv, then FIR.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    if styles.shape != (n, c_in):
        raise ValueError(f"styles must be (N, C_in) = {(n, c_in)}, got {tuple(styles.shape)}")
    dcoefs = demodulation_coefficients(weight, styles, eps=eps) if demodulate else None  # (N, O)
    if not fused:
        x = x * styles[:, :, None, None]  # eq. 1 moved onto the activations: conv(s * x, w) = conv(x, s * w)
        x = conv2d_resample(x, weight, resample_filter, up=up)  # (N, O, H*up, W*up)
        return x if dcoefs is None else x * dcoefs[:, :, None, None]  # eq. 3, likewise moved onto the output
    wts = weight[None] * styles[:, None, :, None, None]  # eq. 1: w'_ijk = s_i w_ijk, (N, O, I, k, k)
    if dcoefs is not None:
        wts = wts * dcoefs[:, :, None, None, None]  # eq. 3: w''_ijk = w'_ijk / sigma_j
    # The batch becomes the channel groups: sample n convolves only its own channels with its own kernel.
    x = conv2d_resample(
        x.reshape(1, n * c_in, h, w), wts.reshape(n * c_out, c_in, kh, kw), resample_filter, up=up, groups=n
    )  # (1, N*O, H*up, W*up)
    return x.reshape(n, c_out, *x.shape[2:])


class ModulatedConv2d(nn.Module):
    """StyleGAN2 synthesis layer core: affine(w) -> styles, modulated conv, [noise], bias + activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        w_dim: int,
        demodulate: bool = True,
        up: int = 1,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        activation: str = "lrelu",
        conv_clamp: float | None = None,
        fused: bool = False,
        noise: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.up, self.activation, self.conv_clamp = demodulate, up, activation, conv_clamp
        # Non-fused by default: on 2 CPU cores (batch 32, 256 channels, 3x3) it was 1.4x (32x32) to 7x (8x8)
        # faster forward and 1.5-7x forward+backward, and also faster at batch 1 and 4. StyleGAN2-ADA
        # trains non-fused as well and fuses only at inference on GPU, which fused=True reproduces.
        self.fused = fused
        # "A" in StyleGAN2 fig. 2: bias_init=1 starts styles near 1, so the layer starts near a plain conv.
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        # Equalized lr. Demodulation cancels any global scale of the weight, but toRGB (demodulate=False)
        # relies on it; StyleGAN2 folds the same factor into toRGB's styles instead.
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("resample_filter", make_filter(resample_filter), persistent=False)
        # Per-pixel noise ("B" in fig. 2c-d) goes between the conv and the bias: any module called as
        # noise(x, noise_mode) -> x, owned by the caller's design (e.g. the synthesis network's NoiseInjection).
        self.noise = noise

    def forward(self, x: Tensor, w: Tensor, *, noise_mode: str = "random", gain: float = 1.0) -> Tensor:
        """x: (N, C_in, H, W), w: (N, w_dim) -> (N, C_out, H*up, W*up); gain scales output and clamp."""
        styles = self.affine(w)  # (N, C_in)
        x = modulated_conv2d(
            x, self.weight * self.weight_gain, styles, demodulate=self.demodulate, up=self.up,
            resample_filter=self.resample_filter, fused=self.fused,
        )
        if self.noise is not None:
            x = self.noise(x, noise_mode)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, activation=self.activation, gain=ACTIVATION_GAINS[self.activation] * gain,
                        clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"demodulate={self.demodulate}, up={self.up}, activation={self.activation}, conv_clamp={self.conv_clamp}"
        )
