"""Equalized learning rate (Karras et al. 2018, ProGAN sec. 4.1) layers and StyleGAN2's fused bias + activation."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.fir import conv2d_resample, make_filter

# Activation -> the gain that restores a unit second moment for unit-Gaussian input (He et al. 2015):
# lrelu(x, 0.2) has E[y^2] = (1 + 0.2^2) / 2, so sqrt(2) brings it to 1.04, as in StyleGAN2's bias_act.
ACTIVATION_GAINS = {"linear": 1.0, "lrelu": math.sqrt(2.0)}
LRELU_SLOPE = 0.2


def check_activation(activation: str) -> None:
    """Fail early, at construction, on an unknown activation name."""
    if activation not in ACTIVATION_GAINS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_GAINS)}, got {activation!r}")


def bias_act(
    x: Tensor,
    b: Tensor | None = None,
    *,
    activation: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> Tensor:
    """clamp(act(x + b) * gain, -clamp, clamp) with b broadcast along dim 1; gain=None uses the activation's gain."""
    check_activation(activation)
    gain = ACTIVATION_GAINS[activation] if gain is None else gain
    if b is not None:
        # In x's dtype: under autocast a conv gives fp16/bf16, and an fp32 bias would promote the activations.
        b = b.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))  # (C,) -> (1, C, 1, ...)
    # Both activations are positively homogeneous, act(x + b) * g = act(g x + g b) for g > 0, so the gain
    # rides along with the bias in one pass (torch.add's alpha) and lrelu runs in place on that fresh
    # tensor: two memory passes instead of three on the largest activations of the network. Autograd
    # allows the in-place lrelu (its backward reads its own output) and R1's double backward through it.
    if activation == "lrelu" and gain <= 0:
        raise ValueError(f"bias_act gain must be positive for lrelu, got {gain}")
    fresh = b is not None or gain != 1.0  # x is then a new tensor that lrelu may overwrite
    if b is not None:
        x = torch.add(b * gain, x, alpha=gain) if gain != 1.0 else x + b
    elif gain != 1.0:
        x = x * gain
    if activation == "lrelu":
        x = F.leaky_relu_(x, LRELU_SLOPE) if fresh else F.leaky_relu(x, LRELU_SLOPE)
    if clamp is not None:
        # StyleGAN2-ADA's conv_clamp: bounds activations so that fp16 layers cannot overflow.
        x = x.clamp(-clamp, clamp)
    return x


class EqualizedLinear(nn.Module):
    """Fully connected layer whose weights are scaled at runtime so every layer learns at the same speed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: str = "linear",
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.lr_multiplier = lr_multiplier
        # ProGAN sec. 4.1: store w ~ N(0, 1) and use w / sqrt(fan_in) (He's init applied at runtime), so
        # Adam's scale-invariant updates move every layer's effective weights at the same relative rate.
        # The lr multiplier divides the stored weight and multiplies the runtime gain: effective weights
        # are unchanged at init, but their updates are lr_multiplier times smaller (StyleGAN 2019, appendix C).
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        # bias_init is the effective bias at init (stored divided by the multiplier); StyleGAN2 stores it
        # undivided, which only differs when both bias_init != 0 and lr_multiplier != 1, not in its configs.
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_multiplier)) if bias else None
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, in_features) -> (N, out_features)."""
        w = self.weight * self.weight_gain
        b = None if self.bias is None else self.bias * self.bias_gain
        if self.activation == "linear":
            return F.linear(x, w, b)
        return bias_act(F.linear(x, w), b, activation=self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
            f"lr_multiplier={self.lr_multiplier}, activation={self.activation}"
        )


class EqualizedConv2d(nn.Module):
    """Same-padded conv with equalized lr, optional 2x FIR up/downsampling, bias, activation and clamp."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        if up > 1 and down > 1:
            raise ValueError(f"use either up or down, got up={up}, down={down}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.activation, self.up, self.down, self.conv_clamp = activation, up, down, conv_clamp
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)  # ProGAN's runtime He scaling
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Derived from the config, so kept out of the state dict; still follows .to(device).
        self.register_buffer("resample_filter", make_filter(resample_filter), persistent=False)

    def forward(self, x: Tensor, *, gain: float = 1.0) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H*up/down, W*up/down); gain scales output and clamp (residual D)."""
        w = self.weight * self.weight_gain
        # down=2: blur then stride-2 conv; up=2: stride-2 transposed conv then blur, as StyleGAN2 resamples.
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, activation=self.activation, gain=ACTIVATION_GAINS[self.activation] * gain,
                        clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
            f"activation={self.activation}, up={self.up}, down={self.down}, conv_clamp={self.conv_clamp}"
        )
