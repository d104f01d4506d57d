"""FIR resampling, equalized lr, bias_act and modulated conv (StyleGAN2): numeric properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layers.equalized import EqualizedConv2d, EqualizedLinear, bias_act
from pipeline.layers.fir import conv2d_resample, downsample2d, make_filter, upsample2d
from pipeline.layers.modulated_conv import ModulatedConv2d, modulated_conv2d


def _fir_response(nu: float) -> float:
    """Frequency response of the normalised [1, 3, 3, 1] filter at nu cycles/sample (taps at +-0.5, +-1.5)."""
    return (6 * math.cos(math.pi * nu) + 2 * math.cos(3 * math.pi * nu)) / 8


def _cosine(freq: float, height: int, width: int) -> torch.Tensor:
    """A horizontal cosine of `freq` cycles/pixel, constant down the columns: (1, 1, H, W)."""
    return torch.cos(2 * math.pi * freq * torch.arange(width, dtype=torch.float32)).expand(1, 1, height, width)


# --- FIR resampling ---------------------------------------------------------------------------------


def test_make_filter_sums_to_one_and_is_the_outer_product():
    f2, f1 = make_filter([1, 3, 3, 1]), make_filter([1, 3, 3, 1], separable=True)
    assert f2.shape == (4, 4) and f1.shape == (4,)
    assert f2.sum().item() == pytest.approx(1.0, abs=1e-7) and f1.sum().item() == pytest.approx(1.0, abs=1e-7)
    torch.testing.assert_close(f2, torch.outer(f1, f1))
    torch.testing.assert_close(f1, torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8)


@pytest.mark.parametrize("separable", [False, True])
def test_resampling_shapes_and_dc(separable):
    f = make_filter([1, 3, 3, 1], separable=separable)
    x = torch.full((2, 3, 8, 8), 0.7)
    up, down = upsample2d(x, f), downsample2d(x, f)
    assert up.shape == (2, 3, 16, 16) and down.shape == (2, 3, 4, 4)
    # A constant stays the same constant; only the outer pixel sees the zero padding.
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.full((2, 3, 14, 14), 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full((2, 3, 2, 2), 0.7), atol=1e-6, rtol=0)


def test_resampling_keeps_pixel_centres():
    # On a ramp x[i] = i, a filter with no shift gives each output pixel the input value at its centre:
    # upsampled pixel n sits at (n - 0.5) / 2 and downsampled pixel m at 2m + 0.5 in input pixel units.
    f = make_filter([1, 3, 3, 1])
    ramp = torch.arange(16, dtype=torch.float32).expand(1, 1, 16, 16)
    up, down = upsample2d(ramp, f)[0, 0, 8], downsample2d(ramp, f)[0, 0, 4]  # one interior row
    torch.testing.assert_close(up[1:-1], (torch.arange(1, 31) - 0.5) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(down[1:-1], torch.arange(1, 7) * 2 + 0.5, atol=1e-5, rtol=0)


def test_separable_filter_matches_2d_filter():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    f2, f1 = make_filter([1, 3, 3, 1]), make_filter([1, 3, 3, 1], separable=True)
    torch.testing.assert_close(upsample2d(x, f1), upsample2d(x, f2), atol=1e-6, rtol=0)
    torch.testing.assert_close(downsample2d(x, f1), downsample2d(x, f2), atol=1e-6, rtol=0)


# The [1, 3, 3, 1] response |H(f)| falls below 1/sqrt(10) only above f = 0.262 cycles/pixel, so 10x holds for
# any frequency from there up to Nyquist; at 0.3 the expected ratio is 1/H^2 = 24 and at 0.4 it is 1148.
@pytest.mark.parametrize("freq", [0.3, 0.4])
def test_downsample_suppresses_aliasing(freq):
    x = _cosine(freq, 64, 64)  # above the new Nyquist of 0.25 cycles/original pixel: it must not fold down

    def energy(y):
        y = y[..., 2:-2, 2:-2]  # away from the zero-padded border
        return (y - y.mean()).square().sum().item()

    skipped = energy(x[..., ::2, ::2])  # plain decimation: the cosine folds onto 1 - 2 * freq at full strength
    assert energy(downsample2d(x, make_filter([1, 3, 3, 1]))) * 10 <= skipped


# Zero insertion mirrors a cosine of f cycles/input pixel (nu = f/2 cycles/output pixel) onto
# 0.5 - nu, above the old Nyquist (0.25 cycles/output pixel). Nearest neighbour is the [1, 1] filter,
# so the ratio of image energies is (cos(pi nu_i) / H(nu_i))^2: 46 at f = 0.25, 23.5 at 0.3, 13.4 at
# 0.35, but only 8.4 at 0.4. [1, 3, 3, 1] reaches 10x only up to f = 0.38 cycles/input pixel (76% of
# the old Nyquist): closer to it the image sits next to the signal and no 4-tap filter can separate
# them. So the test frequency is 0.35 (70% of Nyquist), plus 0.3.
@pytest.mark.parametrize("freq", [0.3, 0.35])
def test_upsample_suppresses_spectral_images(freq):
    x = _cosine(freq, 40, 80)
    crop = 20  # leaves 120 output columns: signal and image both fall on exact FFT bins (no leakage)

    def image_energy(y):
        s = torch.fft.fft2(y[0, 0, crop:-crop, crop:-crop].double()).abs().square()
        fy = torch.fft.fftfreq(s.shape[0]).abs()[:, None]
        fx = torch.fft.fftfreq(s.shape[1]).abs()[None, :]
        return s[(fy > 0.25) | (fx > 0.25)].sum().item()  # everything the input grid could not hold

    fir = image_energy(upsample2d(x, make_filter([1, 3, 3, 1])))
    nearest = image_energy(F.interpolate(x, scale_factor=2, mode="nearest"))
    assert fir * 10 <= nearest
    nu_image = 0.5 - freq / 2
    expected = (math.cos(math.pi * nu_image) / _fir_response(nu_image)) ** 2
    assert nearest / fir == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("k", [1, 3])
def test_conv2d_resample_matches_resample_then_conv(k):
    torch.manual_seed(0)
    f = make_filter([1, 3, 3, 1])
    x, w = torch.randn(2, 4, 12, 12), torch.randn(5, 4, k, k) / math.sqrt(4 * k * k)
    b = k // 2  # outputs within k // 2 of the border see the zero padding at a different stage
    inner = (..., slice(b, -b or None), slice(b, -b or None))
    up = conv2d_resample(x, w, f, up=2)  # transposed conv, then FIR
    assert up.shape == (2, 5, 24, 24)
    torch.testing.assert_close(up[inner], F.conv2d(upsample2d(x, f), w, padding=b)[inner], atol=1e-5, rtol=0)
    down = conv2d_resample(x, w, f, down=2)  # FIR, then stride-2 conv
    assert down.shape == (2, 5, 6, 6)
    torch.testing.assert_close(down[inner], downsample2d(F.conv2d(x, w, padding=b), f)[inner], atol=1e-5, rtol=0)


# --- equalized lr and bias_act ------------------------------------------------------------------------


def test_equalized_linear_runtime_scaling():
    torch.manual_seed(0)
    layer = EqualizedLinear(64, 32, bias_init=0.5, lr_multiplier=0.01)
    x = torch.randn(4, 64)
    # Effective weight = stored * lr_multiplier / sqrt(fan_in); effective bias = stored * lr_multiplier.
    expected = x @ (layer.weight * 0.01 / math.sqrt(64)).T + layer.bias * 0.01
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(torch.zeros(1, 64)), torch.full((1, 32), 0.5))  # bias_init is the effective bias


def test_equalized_linear_weight_statistics():
    torch.manual_seed(0)
    layer = EqualizedLinear(512, 512, lr_multiplier=0.01)
    n = layer.weight.numel()
    # Stored ~ N(0, (1/lr)^2), effective ~ N(0, 1/fan_in). The sample std has relative std error 1/sqrt(2n).
    tol = 5 / math.sqrt(2 * n)
    assert layer.weight.std().item() == pytest.approx(100.0, rel=tol)
    assert (layer.weight * layer.weight_gain).std().item() == pytest.approx(1 / math.sqrt(512), rel=tol)


@pytest.mark.parametrize(("activation", "slope"), [("lrelu", 0.2), ("linear", 1.0)])
def test_bias_act_gain_keeps_second_moment(activation, slope):
    torch.manual_seed(0)
    n = 1_000_000
    y = bias_act(torch.randn(n), activation=activation)
    # y = g * lrelu(x) with g^2 = 2 for lrelu: E[y^2] = g^2 (1 + a^2) / 2 = 1.04, E[y^4] = g^4 * 3 (1 + a^4) / 2.
    g2 = 2.0 if activation == "lrelu" else 1.0
    m2 = g2 * (1 + slope**2) / 2
    m4 = g2**2 * 3 * (1 + slope**4) / 2
    std_error = math.sqrt((m4 - m2**2) / n)  # of the sample mean of y^2
    assert y.square().mean().item() == pytest.approx(m2, abs=5 * std_error)


def test_bias_act_bias_and_clamp():
    x = torch.linspace(-10, 10, 41).reshape(1, 1, 41).expand(2, 3, 41)
    b = torch.tensor([0.0, 1.0, -1.0])
    y = bias_act(x, b, activation="lrelu", clamp=4.0)
    ref = F.leaky_relu(x + b[None, :, None], 0.2) * math.sqrt(2)
    assert y.abs().max().item() == 4.0
    inside = ref.abs() <= 4.0
    torch.testing.assert_close(y[inside], ref[inside])
    assert bias_act(x, b, gain=0.5).equal((x + b[None, :, None]) * 0.5)
    with pytest.raises(ValueError, match="activation"):
        EqualizedLinear(2, 2, activation="relu")


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_in_place_lrelu_keeps_first_and_second_derivatives(with_bias):
    # The fused path (gain folded into the bias add, lrelu in place) must differentiate like the textbook
    # act(x + b) * g, including the double backward that R1 takes through every D layer.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, b) if with_bias else (x,)

    def fused(*args):
        return bias_act(args[0], args[1] if with_bias else None, activation="lrelu", gain=1.7)

    def textbook(*args):
        z = args[0] + args[1][None, :, None] if with_bias else args[0]
        return F.leaky_relu(z, 0.2) * 1.7

    torch.testing.assert_close(fused(*inputs), textbook(*inputs), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)
    # The caller's tensor is never written in place, with or without a bias.
    before = x.detach().clone()
    bias_act(x.detach(), None, activation="lrelu", gain=1.0)
    assert x.detach().equal(before)
    with pytest.raises(ValueError, match="gain must be positive"):
        bias_act(x, b, activation="lrelu", gain=-1.0)
    # A linear bias_act is homogeneous for any gain: a negative one is allowed and exact.
    torch.testing.assert_close(bias_act(x, b, activation="linear", gain=-2.0),
                               -2.0 * (x + b[None, :, None] if with_bias else x))


def test_equalized_conv2d_resampling_and_gain():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    down = EqualizedConv2d(4, 6, 3, down=2, activation="lrelu", conv_clamp=1.0)
    y = down(x)
    assert y.shape == (2, 6, 8, 8) and y.abs().max().item() <= 1.0
    up = EqualizedConv2d(4, 6, 1, up=2)
    assert up(x).shape == (2, 6, 32, 32)
    # Linear layer: the forward gain (sqrt(0.5) in StyleGAN2's residual D) scales the output exactly.
    torch.testing.assert_close(up(x, gain=math.sqrt(0.5)), up(x) * math.sqrt(0.5))
    with pytest.raises(ValueError, match="odd"):
        EqualizedConv2d(4, 6, 2)


# --- modulated conv ------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_modulated_conv_with_unit_styles_is_conv2d(fused):
    torch.manual_seed(0)
    x, w = torch.randn(3, 8, 10, 10), torch.randn(6, 8, 3, 3) / math.sqrt(8 * 9)
    ones = torch.ones(3, 8)
    y = modulated_conv2d(x, w, ones, demodulate=False, fused=fused)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), atol=1e-5, rtol=0)
    f = make_filter([1, 3, 3, 1])
    y_up = modulated_conv2d(x, w, ones, demodulate=False, up=2, resample_filter=f, fused=fused)
    torch.testing.assert_close(y_up, conv2d_resample(x, w, f, up=2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("up", [1, 2])
def test_fused_equals_non_fused(up):
    torch.manual_seed(0)
    f = make_filter([1, 3, 3, 1])
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    s = (torch.randn(4, 8).exp()).requires_grad_()  # random positive styles
    outs, grads = [], []
    for fused in (True, False):
        y = modulated_conv2d(x, w, s, up=up, resample_filter=f, fused=fused)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), (x, w, s)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for g_fused, g_plain in zip(*grads):
        torch.testing.assert_close(g_fused, g_plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_demodulation_gives_unit_output_variance(fused):
    torch.manual_seed(0)
    n, c_in, c_out, size = 8, 32, 8, 98
    x = torch.randn(n, c_in, size, size)  # iid N(0, 1)
    w = torch.randn(c_out, c_in, 3, 3)
    s = torch.randn(n, c_in).exp()  # positive styles spanning about two decades
    y = modulated_conv2d(x, w, s, demodulate=True, fused=fused)
    # Eq. 3 makes sum_{i,k} w''^2 = 1 (up to eps), so each output is N(0, 1) for iid unit inputs. Drop the
    # zero-padded border and keep every 3rd pixel: 3x3 receptive fields no longer overlap, so the
    # samples are independent, and the mean of y^2 has relative std error sqrt(2 / N) exactly.
    samples = y[:, :, 1:-1:3, 1:-1:3].transpose(0, 1).reshape(c_out, -1)  # (C_out, N * 32 * 32)
    second_moment = samples.square().mean(dim=1)
    tol = 5 * math.sqrt(2 / samples.shape[1])
    torch.testing.assert_close(second_moment, torch.ones(c_out), atol=tol, rtol=0)
    # Without eq. 3 the same inputs are far from unit variance: the check has teeth.
    plain = modulated_conv2d(x, w / math.sqrt(c_in * 9), s, demodulate=False, fused=fused)
    assert (plain[:, :, 1:-1:3, 1:-1:3].square().mean() - 1).abs().item() > 10 * tol


class _AddConstant(nn.Module):
    """Stand-in for a noise module: records the mode and adds a constant."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.modes = value, []

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        self.modes.append(mode)
        return x + self.value


def test_modulated_conv_module():
    torch.manual_seed(0)
    noise = _AddConstant(0.3)
    layer = ModulatedConv2d(8, 16, 3, w_dim=12, up=2, conv_clamp=256.0, noise=noise)
    with torch.no_grad():
        layer.bias.normal_()
    x, w = torch.randn(3, 8, 8, 8), torch.randn(3, 12)
    torch.testing.assert_close(layer.affine(torch.zeros(1, 12)), torch.ones(1, 8))  # styles start at 1
    y = layer(x, w, noise_mode="const")
    assert y.shape == (3, 16, 16, 16) and noise.modes == ["const"]
    # Noise enters after the conv and before bias + lrelu (StyleGAN2 fig. 2c).
    conv = modulated_conv2d(x, layer.weight * layer.weight_gain, layer.affine(w), up=2,
                            resample_filter=layer.resample_filter, fused=False)
    torch.testing.assert_close(y, bias_act(conv + 0.3, layer.bias, activation="lrelu"), atol=1e-5, rtol=0)
    layer.fused = True
    torch.testing.assert_close(layer(x, w), y, atol=1e-5, rtol=0)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert "resample_filter" not in layer.state_dict()  # derived from the config, not a checkpointed tensor


def test_to_rgb_style_layer_is_linear_without_demodulation():
    torch.manual_seed(0)
    to_rgb = ModulatedConv2d(16, 3, 1, w_dim=12, demodulate=False, activation="linear")
    x, w = torch.randn(2, 16, 4, 4), torch.randn(2, 12)
    # Doubling the input doubles the (bias-free at init) output: no demodulation, no activation.
    torch.testing.assert_close(to_rgb(2 * x, w), 2 * to_rgb(x, w), atol=1e-5, rtol=1e-5)
