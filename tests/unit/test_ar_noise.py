"""noise_mode=ar: the injected AR field has the configured coefficients and unit variance; learn=true trains them."""
import math

import pytest
import torch

from pipeline.diagnostics.noise import ar2d_stationary_variance, fit_ar2d, nshp_offsets
from pipeline.models.stylegan2.ar_noise import (
    AR_PAD,
    LEARN_MAX_L1,
    ar_filter_spectrum,
    ar_torus_field,
    check_noise_ar,
    fit_noise_ar,
)
from pipeline.models.stylegan2.generator import Generator
from pipeline.models.stylegan2.synthesis import NoiseInjection

COEFFS = {"0,1": 0.4, "1,0": 0.3, "1,1": -0.1, "1,-1": 0.05}
OFFSETS = nshp_offsets(1)


def _injected(noise_ar: dict, n: int = 64, res: int = 32, seed: int = 0) -> torch.Tensor:
    """The noise a layer adds, (N, H, W): zero input, strength 1."""
    torch.manual_seed(seed)
    layer = NoiseInjection(channels=1, resolution=res, noise_ar=check_noise_ar(noise_ar))
    with torch.no_grad():
        layer.strength.fill_(1.0)
        return layer(torch.zeros(n, 1, res, res), "ar")[:, 0]


def _variance_tolerance(coeffs: dict, num_values: int) -> float:
    """5 standard errors of mean(x^2) for a unit-variance Gaussian field: var = (2 / M) sum_d rho(d)^2, and
    sum_d rho(d)^2 = mean(S^2) / mean(S)^2 for the spectral density S = 1/|A|^2 (Parseval)."""
    spec = check_noise_ar({"coefficients": coeffs}).initial().double()
    s = ar_filter_spectrum(spec, OFFSETS, (256, 256)).abs().pow(-2)
    return 5 * math.sqrt(2 * float(s.square().mean() / s.mean().square()) / num_values)


@pytest.mark.parametrize("coeffs", [COEFFS, {}], ids=["ar", "zero"])
@pytest.mark.parametrize("learn", [False, True])
def test_injected_noise_has_the_coefficients_and_unit_variance(coeffs, learn):
    x = _injected({"order": 1, "coefficients": coeffs, "learn": learn})
    fit = fit_ar2d(x, order=1)
    for key, (di, dj) in zip(["0,1", "1,-1", "1,0", "1,1"], OFFSETS):
        a, se = fit["coefficients"][(di, dj)], fit["stderr"][(di, dj)]
        assert abs(a - coeffs.get(key, 0.0)) < 5 * se, (key, a, se)
    assert abs(float(x.square().mean()) - 1) < _variance_tolerance(coeffs, x.numel())


def test_torus_field_solves_the_recursion_exactly_and_normalizes_with_the_stationary_variance():
    torch.manual_seed(0)
    a = check_noise_ar({"coefficients": COEFFS}).initial().double()
    e = torch.randn(2, 40, 40, dtype=torch.float64)
    x = ar_torus_field(e, a, OFFSETS)
    var = ar2d_stationary_variance({o: float(v) for o, v in zip(OFFSETS, a)}, grid=40)
    raw = x * math.sqrt(var)  # undo the normalization: the field driven by e itself
    pred = sum(float(ak) * torch.roll(raw, shifts=(di, dj), dims=(1, 2)) for ak, (di, dj) in zip(a, OFFSETS))
    torch.testing.assert_close(raw - pred, e, rtol=0, atol=1e-10)  # circular recursion, float64 FFT rounding


def test_learned_coefficients_get_gradients_and_stay_stable():
    torch.manual_seed(0)
    layer = NoiseInjection(channels=2, resolution=8, noise_ar=check_noise_ar({"learn": True}))
    with torch.no_grad():
        layer.strength.fill_(1.0)
    opt = torch.optim.SGD(layer.ar.parameters(), lr=100.0)
    for _ in range(20):  # push hard toward row-correlated noise: the parametrization must keep sum |a| < 0.9
        x = layer(torch.zeros(8, 2, 8, 8), "ar")
        loss = -(x[..., 1:] * x[..., :-1]).mean()
        opt.zero_grad()
        loss.backward()
        assert layer.ar.raw.grad is not None and layer.ar.raw.grad.abs().sum() > 0
        opt.step()
    a = layer.ar.coefficients()
    a = a.detach()
    assert float(a.abs().sum()) < LEARN_MAX_L1 and float(a[0]) > 0.5  # (0,1) learned, still stable
    assert torch.isfinite(layer(torch.zeros(8, 2, 8, 8), "ar")).all()


def test_learn_starts_from_the_given_coefficients():
    layer = NoiseInjection(channels=1, resolution=8, noise_ar=check_noise_ar({"coefficients": COEFFS, "learn": True}))
    torch.testing.assert_close(layer.ar.coefficient_dict(), COEFFS, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_stylegan2_forward_with_ar_noise(resolution):
    torch.manual_seed(0)
    G = Generator(resolution=resolution, channels=1, num_classes=3, z_dim=16, w_dim=16, mapping_layers=2,
                  channel_base=256, channel_max=16, style_mixing_prob=0.0, noise_mode="ar",
                  noise_ar={"coefficients": COEFFS}).train()
    for m in G.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.5)
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    a, b = G(z, y), G(z, y)
    assert a.shape == (4, 1, resolution, resolution) and torch.isfinite(a).all()
    assert not torch.equal(a, b)  # fresh noise every training forward
    G.eval()
    torch.testing.assert_close(G(z, y), G(z, y))  # eval: the const noise, as with random
    assert AR_PAD >= 2 * 32  # wrap-around lags exceed the largest layer tested here twice over


@pytest.mark.parametrize("noise_ar,match", [
    ({"orde": 1}, r"noise_ar\.orde is not a known key"),
    ({"order": 0}, r"noise_ar\.order=0"),
    ({"learn": "yes"}, r"noise_ar\.learn='yes'"),
    ({"coefficients": {"0,-1": 0.1}}, r"noise_ar\.coefficients offset \(0, -1\)"),
    ({"coefficients": {"2,0": 0.1}}, r"raise model\.generator\.noise_ar\.order"),
    ({"coefficients": {"x": 0.1}}, r"noise_ar\.coefficients key 'x'"),
    ({"coefficients": {"0,1": float("nan")}}, r"noise_ar\.coefficients\['0,1'\]"),
    ({"coefficients": {"0,1": 0.6, "1,0": 0.4}}, r"noise_ar\.coefficients have min \|A\(w\)\| = 0\.000"),
    ({"coefficients": {"0,1": 0.95}, "learn": True}, r"< 0\.9 with learn=true"),
])
def test_bad_config_names_the_key(noise_ar, match):
    with pytest.raises(ValueError, match=match):
        Generator(resolution=8, channels=1, num_classes=0, z_dim=8, w_dim=8, mapping_layers=1, channel_base=64,
                  channel_max=8, noise_mode="ar", noise_ar=noise_ar)
    with pytest.raises(ValueError, match="model.generator.noise_mode='AR'"):
        Generator(resolution=8, channels=1, num_classes=0, noise_mode="AR")


def test_fit_noise_ar_returns_the_config_format():
    torch.manual_seed(0)
    coeffs = fit_noise_ar(torch.rand(16, 1, 16, 16) * 2 - 1, order=1)
    assert set(coeffs) == {"0,1", "1,-1", "1,0", "1,1"}
    # box3 residuals of white pixels: negatively correlated neighbours, sum |a| ~ 1.1 > 1, yet accepted
    assert all(-0.4 < a < -0.15 for a in coeffs.values()), coeffs
    check_noise_ar({"order": 1, "coefficients": coeffs})
