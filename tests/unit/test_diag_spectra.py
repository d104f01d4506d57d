"""Weight and image spectra (pipeline/diagnostics/spectra.py) against dense SVDs and closed-form spectra."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diagnostics.spectra import (
    conv_operator_singular_values,
    dilate_kernel,
    frequency_radius,
    radial_average,
    radial_power_spectrum,
    spectral_discrepancy,
    weight_spectra,
)
from pipeline.layers.equalized import EqualizedConv2d, EqualizedLinear
from pipeline.layers.spectral import sn


def dense_circular_conv(weight: torch.Tensor, n: int, dilation: int = 1) -> torch.Tensor:
    """The (O n^2, I n^2) matrix of F.conv2d with circular 'same' padding, column j = conv of basis image j."""
    o, i, kh, kw = weight.shape
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    basis = torch.eye(i * n * n, dtype=weight.dtype).reshape(i * n * n, i, n, n)
    padded = F.pad(basis, (pw, pw, ph, ph), mode="circular")
    return F.conv2d(padded, weight, dilation=dilation).reshape(i * n * n, o * n * n).T


@pytest.mark.parametrize("o, i, k, n, dilation", [(4, 3, 3, 6, 1), (2, 5, 3, 8, 1), (3, 3, 5, 8, 1), (3, 2, 3, 8, 2)])
def test_conv_operator_matches_dense_svd(o, i, k, n, dilation):
    """Sedghi et al. 2019 Thm. 6: the per-frequency values, pooled and sorted, are the dense operator's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(i, o, k, padding=dilation * (k - 1) // 2, dilation=dilation, padding_mode="circular",
                     bias=False).double()
    dense = torch.linalg.svdvals(dense_circular_conv(conv.weight.detach(), n, dilation))  # (min(O, I) n^2,)
    report = weight_spectra(conv, feature_size=n)[""]["operator"]
    assert report["exact"]
    per_freq = conv_operator_singular_values(dilate_kernel(conv.weight.detach(), (dilation, dilation)), n)
    assert per_freq.shape == (n, n, min(o, i))
    pooled = per_freq.flatten().sort(descending=True).values
    torch.testing.assert_close(pooled, dense, rtol=0, atol=1e-12)
    assert report["sigma_max"] == pytest.approx(dense[0].item(), abs=1e-12)
    assert torch.tensor(report["sigma_max_map"]).shape == (n, n)


def test_conv_operator_parseval_and_orthogonal_1x1():
    """sum of squared operator values = n^2 ||w||_F^2 (each output pixel sees the whole kernel); an orthogonal
    1x1 conv has the same (orthogonal) block at every frequency, so all its operator values are 1."""
    torch.manual_seed(1)
    n = 7
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    sv = conv_operator_singular_values(w, n)
    assert sv.square().sum().item() == pytest.approx(n * n * w.square().sum().item(), rel=1e-12)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    ones = conv_operator_singular_values(q[:, :, None, None], n)
    torch.testing.assert_close(ones, torch.ones(n, n, 6, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        conv_operator_singular_values(w, 2)


def test_spectral_norm_sigma_max_converges_to_one():
    """Torch's SN after k training-mode forwards: sigma_est = u^T W v with tan(angle(v, v1)) shrinking by
    (s2/s1)^2 per pass, so sigma_max(W / sigma_est) - 1 = O((s2/s1)^(4k) tan^2) = 2^-40 tan^2 here."""
    torch.manual_seed(2)
    layer = sn(nn.Linear(16, 8, bias=False).double(), n_power_iterations=1, eps=1e-12)
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64))
    spectrum = torch.tensor([4.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.1], dtype=torch.float64)  # s2 / s1 = 1/2
    with torch.no_grad():  # new spectrum and singular vectors: SN's stored u, v are now far off
        layer.parametrizations.weight.original.copy_(u @ torch.diag(spectrum) @ v.T)
    stale = weight_spectra(layer)[""]["sigma_max"]
    layer.train()
    for _ in range(10):
        layer(torch.randn(2, 16, dtype=torch.float64))
    u_before = layer.parametrizations.weight[0]._u.clone()
    report = weight_spectra(layer)[""]
    assert abs(stale - 1.0) > 1e-3  # the check below is not trivially true
    assert report["sigma_max"] == pytest.approx(1.0, abs=1e-6)
    assert report["quantiles"]["0"] == pytest.approx(0.1 / 4.0, rel=1e-6)  # the spectrum divided by s1
    # Reading is side-effect free: eval mode kept SN's power iteration still, and train mode is restored.
    assert torch.equal(layer.parametrizations.weight[0]._u, u_before) and layer.training


def test_orthogonal_weights_have_unit_singular_values():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Conv2d(16, 4, 3))  # (16, 8) and (4, 144): full-rank orthogonal
    for m in model:
        nn.init.orthogonal_(m.weight)
    reports = weight_spectra(model, full=True)
    for name, rank in (("0", 8), ("1", 4)):
        values = torch.tensor(reports[name]["singular_values"])
        torch.testing.assert_close(values, torch.ones(rank), rtol=0, atol=1e-5)
        assert reports[name]["stable_rank"] == pytest.approx(rank, rel=1e-4)


def test_equalized_layers_report_the_runtime_weight():
    """ProGAN's equalized lr multiplies the stored weight by 1/sqrt(fan_in) in forward; the report sees that."""
    torch.manual_seed(4)
    model = nn.ModuleDict({"fc": EqualizedLinear(32, 8), "conv": EqualizedConv2d(4, 6, 3, down=2)})
    reports = weight_spectra(model, feature_size=8)
    fc = torch.linalg.svdvals(model["fc"].weight.detach() / math.sqrt(32))
    conv = torch.linalg.svdvals(model["conv"].weight.detach().reshape(6, -1) / math.sqrt(4 * 9))
    assert reports["fc"]["sigma_max"] == pytest.approx(fc[0].item(), rel=1e-5)
    assert reports["conv"]["sigma_max"] == pytest.approx(conv[0].item(), rel=1e-5)
    assert not reports["conv"]["operator"]["exact"] and "resamples" in reports["conv"]["operator"]["note"]
    json.dumps(reports)  # the report is JSON-ready


def test_grouped_and_transposed_convs_pool_their_blocks():
    """A grouped conv is block-diagonal over groups; a transposed conv is the adjoint of a conv (same values)."""
    torch.manual_seed(5)
    n = 6
    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular", bias=False).double()
    w = grouped.weight.detach()  # (6, 2, 3, 3): groups of (3, 2)
    expected = torch.cat([torch.linalg.svdvals(dense_circular_conv(w[g * 3:(g + 1) * 3], n)) for g in range(2)])
    assert weight_spectra(grouped, feature_size=n)[""]["operator"]["sigma_max"] == pytest.approx(
        expected.max().item(), abs=1e-12)
    transposed = nn.ConvTranspose2d(3, 5, 3, bias=False).double()  # weight (3, 5, 3, 3)
    adjoint = torch.linalg.svdvals(dense_circular_conv(transposed.weight.detach(), n))
    report = weight_spectra(transposed, feature_size=n)[""]
    assert report["shape"] == [5, 3, 3, 3]
    assert report["operator"]["sigma_max"] == pytest.approx(adjoint[0].item(), abs=1e-12)


# ---- image spectra -----------------------------------------------------------------------------------------
def ring_sizes(n: int) -> torch.Tensor:
    r = frequency_radius(n).flatten()
    return torch.bincount(r[(r >= 1) & (r <= n // 2)] - 1, minlength=n // 2)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact circular Gaussian blur, in the Fourier domain (a truncated spatial kernel would leave a floor)."""
    n = x.shape[-1]
    f = torch.fft.fftfreq(n, d=1.0 / n, dtype=x.dtype)
    transfer = torch.exp(-2 * math.pi**2 * sigma**2 * (f[:, None] ** 2 + f[None, :] ** 2) / n**2)
    return torch.fft.ifft2(torch.fft.fft2(x) * transfer).real


def test_white_noise_spectrum_is_flat():
    """Unit white noise has E|X^(f)|^2 = 1 (orthonormal DFT). A ring of m points holds m/2 conjugate pairs of
    Exp(1) values, so the mean over N C images and the ring has relative std <= sqrt(2 / (N C m))."""
    torch.manual_seed(6)
    n_img, c, n = 64, 3, 32
    spectrum = radial_power_spectrum(torch.randn(n_img, c, n, n, dtype=torch.float64))
    assert spectrum.shape == (n // 2,)
    sigma = torch.sqrt(2.0 / (n_img * c * ring_sizes(n).double()))
    assert ((spectrum - 1).abs() < 5 * sigma).all(), (spectrum - 1) / sigma
    # Hann: same level (unit mean-square window) from r = 2 on. r = 1 loses the leakage of the missing DC:
    # the normalized |W^|^2 is 1/9 at (1, 0) and 1/36 at (1, 1), so 1 - (4/9 + 4/36) / 8 = 1 - 5/72. Neighbouring
    # frequencies are correlated over Hann's 1.5-bin noise bandwidth per axis, which raises the ring std
    # (1.2-1.6x measured over 300 draws): 5 sigma at 2x.
    hann = radial_power_spectrum(torch.randn(n_img, c, n, n, dtype=torch.float64), window="hann")
    assert ((hann[1:] - 1).abs() < 5 * 2 * sigma[1:]).all(), (hann - 1) / sigma
    assert hann[0] == pytest.approx(1 - 5 / 72, abs=5 * 2 * sigma[0].item())


def test_blurred_noise_spectrum_follows_the_gaussian_transfer():
    """Blur multiplies the power by |H(f)|^2 = exp(-4 pi^2 s^2 |f|^2 / n^2): the ring means follow its ring
    average within the white-noise tolerance, and so decrease monotonically with the radius."""
    torch.manual_seed(7)
    n_img, c, n, s = 64, 1, 32, 1.5
    blurred = gaussian_blur(torch.randn(n_img, c, n, n, dtype=torch.float64), s)
    spectrum = radial_power_spectrum(blurred)
    f = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    expected = radial_average(torch.exp(-4 * math.pi**2 * s**2 * (f[:, None] ** 2 + f[None, :] ** 2) / n**2))
    sigma = torch.sqrt(2.0 / (n_img * c * ring_sizes(n).double()))
    assert ((spectrum / expected - 1).abs() < 5 * sigma).all()
    assert (spectrum[2:].diff() < 0).all()  # falls off at every ring from r = 3 to n / 2


def test_spectral_discrepancy():
    torch.manual_seed(8)
    sharp = torch.randn(32, 3, 16, 16, dtype=torch.float64)
    assert spectral_discrepancy(sharp, sharp.clone()) == 0.0
    blurred = gaussian_blur(sharp, 1.0)
    d = spectral_discrepancy(blurred, sharp)
    # Per ring the power ratio is a weighted mean of |H|^2 over the ring, so it lies between the ring's
    # min and max of |H|^2: the discrepancy lies between the means over rings of -log10 of those.
    n = 16
    f = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    decades = 4 * math.pi**2 * (f[:, None] ** 2 + f[None, :] ** 2) / n**2 / math.log(10)  # -log10 |H|^2
    r = frequency_radius(n)
    lo = torch.stack([decades[r == k].min() for k in range(1, n // 2 + 1)]).mean()
    hi = torch.stack([decades[r == k].max() for k in range(1, n // 2 + 1)]).mean()
    assert lo - 1e-9 <= d <= hi + 1e-9 and d > 0.5
    assert spectral_discrepancy(sharp, blurred) == pytest.approx(d, rel=1e-12)  # symmetric
    with pytest.raises(ValueError, match="same size"):
        spectral_discrepancy(sharp, sharp[..., :8, :8])
