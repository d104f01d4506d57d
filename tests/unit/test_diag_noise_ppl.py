"""Noise AR statistics and perceptual path length: numeric properties with tolerances from sampling theory."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.diagnostics.noise import (
    ar2d_stationary_variance,
    fit_ar2d,
    highpass,
    image_ar_report,
    nshp_offsets,
    sample_ar2d,
)
from pipeline.diagnostics.ppl import (
    diagonal_dominance,
    feature_fn_from_net,
    jacobian_diagonality,
    lerp,
    path_distances,
    ppl,
    slerp,
    trimmed_mean,
)
from pipeline.metrics.domain_net import DomainNet
from pipeline.metrics.features import FeatureNet
from pipeline.models.stylegan2.generator import Generator

AR = {(0, 1): 0.4, (1, 0): 0.3, (1, 1): -0.1}  # stable: sum |a| = 0.8 < 1


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


@pytest.fixture(scope="module")
def ar_fields() -> torch.Tensor:
    return sample_ar2d(AR, (64, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def spectrum(coefficients: dict, grid: int = 256) -> torch.Tensor:
    """S(w) = 1 / |A(w)|^2 on a grid (unit innovation variance)."""
    h = torch.zeros(grid, grid, dtype=torch.float64)
    h[0, 0] = 1.0
    for (di, dj), a in coefficients.items():
        h[di % grid, dj % grid] -= a
    return 1 / torch.fft.fft2(h).abs().square()


# ---------------------------------------------------------------- noise


def test_nshp_neighbourhood_sizes():
    assert nshp_offsets(1) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert len(nshp_offsets(2)) == 2 + 2 * 5


def test_fit_recovers_known_coefficients(ar_fields):
    fit = fit_ar2d(ar_fields, order=1)
    # LS theory: sd(a_k) = sqrt(sigma_e^2 [(X^T X)^-1]_kk) ~ 1 / sqrt(M) (M = 64 * 63 * 62 ~ 250k: ~0.002)
    for o, a_hat in fit["coefficients"].items():
        assert abs(a_hat - AR.get(o, 0.0)) < 5 * fit["stderr"][o] < 0.012, (o, a_hat)
    assert fit["noise_var"] == pytest.approx(1.0, abs=5 * math.sqrt(2 / fit["num_equations"]))


def test_sampled_field_has_the_stationary_variance(ar_fields):
    s = spectrum(AR)
    var_theory = ar2d_stationary_variance(AR)
    assert var_theory == pytest.approx(float(s.mean()))
    # sample variance of a Gaussian field: var(s^2) / var^2 = 2 sum_h rho(h)^2 / n = 2 mean(S^2) / mean(S)^2 / n
    rel_sd = math.sqrt(2 * float((s.square().mean() / s.mean() ** 2)) / ar_fields.numel())
    assert float(ar_fields.var()) == pytest.approx(var_theory, rel=5 * rel_sd)  # burn-in removed the zero border


def test_explained_variance_matches_theory(ar_fields):
    fit = fit_ar2d(ar_fields, order=1)
    var_x = float(ar_fields.var())
    expected = 1 - 1.0 / var_x  # sigma_e^2 = 1
    # error = (1 - noise_var) / var_x (sd sqrt(2 / M)) plus the gap between var(x) over all pixels and over the
    # fit's targets (94% of them: sd ~ rel_sd(var) * sqrt(0.06 / 0.94) ~ 0.25 * 0.004)
    tol = 5 * (math.sqrt(2 / fit["num_equations"]) + 0.25 * 0.004) / var_x
    assert fit["explained_variance_fraction"] == pytest.approx(expected, abs=tol)


def test_white_noise_has_no_ar_structure():
    x = torch.randn(64, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fit = fit_ar2d(x, order=2)
    for o, a_hat in fit["coefficients"].items():
        assert abs(a_hat) < 5 * fit["stderr"][o], (o, a_hat)
    # explained fraction ~ (chi2_K - K) / M for white noise: sd sqrt(2 K) / M (K + 1 with the centred variance)
    k, m = len(fit["coefficients"]), fit["num_equations"]
    assert abs(fit["explained_variance_fraction"]) < 5 * math.sqrt(2 * (k + 1)) / m


@pytest.mark.parametrize("kind,white_gain", [("box3", 8 / 9), ("laplacian", 1.25)])
def test_highpass_kills_ramps_and_has_the_kernel_noise_gain(kind, white_gain):
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (3.0 + 0.5 * i - 0.2 * j).expand(2, 3, 16, 16)  # constants and linear ramps: symmetric zero-sum kernel
    assert highpass(ramp, kind).abs().max() < 1e-5
    x = torch.randn(64, 1, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = highpass(x, kind)
    assert r.shape == (64, 1, 62, 62)
    # white noise through kernel k has variance sum k^2 (8/9 for box3, 1 + 4/16 for laplacian); the residual is
    # weakly correlated (sum_h rho^2 < 2), so sd(var) < sqrt(4 / n)
    assert float(r.var()) == pytest.approx(white_gain, rel=5 * math.sqrt(4 / r.numel()))


def test_image_report_of_white_images_matches_yule_walker_for_the_filtered_noise():
    # white images through the box3 high-pass are an MA field with autocovariance gamma(h) = sum_m k_m k_(m+h); the
    # LS fit converges to the best causal linear predictor: explained fraction gamma_v^T Gamma^-1 gamma_v / gamma(0)
    images = 0.1 * torch.randn(32, 3, 34, 34, generator=torch.Generator().manual_seed(3))
    rep = image_ar_report(images, order=1)  # 8-bit rounding adds variance (1/127.5)^2 / 12: 0.06% of 0.01 * 8/9
    impulse = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    impulse[0, 0, 2, 2] = 1.0
    k = highpass(impulse, "box3")[0, 0]  # the (symmetric) kernel, (3, 3)
    gamma = torch.nn.functional.conv2d(torch.nn.functional.pad(k, (2, 2, 2, 2))[None, None], k[None, None])[0, 0]

    def g(h):  # gamma at lag h = (di, dj); zero beyond the 5x5 support
        return float(gamma[h[0] + 2, h[1] + 2]) if abs(h[0]) <= 2 and abs(h[1]) <= 2 else 0.0

    offsets = nshp_offsets(1)
    Gam = torch.tensor([[g((a[0] - b[0], a[1] - b[1])) for b in offsets] for a in offsets], dtype=torch.float64)
    gv = torch.tensor([g(o) for o in offsets], dtype=torch.float64)
    expected = float(gv @ torch.linalg.solve(Gam, gv)) / g((0, 0))
    assert rep["residual_std"] ** 2 == pytest.approx(0.01 * 8 / 9, rel=0.02)  # sd sqrt(4 / n) ~ 0.2% (see above)
    # two variance estimates, each with relative sd ~ sqrt(2 / M) for weakly correlated residuals
    tol = 5 * 2 * math.sqrt(2 / rep["num_equations"])
    assert rep["explained_variance_fraction"] == pytest.approx(expected, abs=tol)
    assert len(rep["per_channel_explained_variance_fraction"]) == 3 and "0,1" in rep["coefficients"]


def test_unstable_or_noncausal_coefficients_raise():
    with pytest.raises(ValueError, match="causal"):
        sample_ar2d({(0, -1): 0.5}, (1, 8, 8))
    with pytest.raises(ValueError, match="stable"):
        sample_ar2d({(0, 1): 1.5, (1, 0): 1.5}, (1, 64, 64), burn_in=64)


# ---------------------------------------------------------------- perceptual path length


class LinearG(nn.Module):
    """G(z) = A z as a (1, 4, 4) image (A: (16, z_dim)); an unconditional stand-in with a closed-form PPL."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.z_dim, self.num_classes = A.shape[1], 0

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return (z @ self.A.T).view(-1, 1, 4, 4)


class ConstantG(LinearG):
    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.A.sum().expand(len(z), 1, 4, 4)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def tiny_stylegan2() -> Generator:
    torch.manual_seed(0)
    return Generator(resolution=16, channels=1, num_classes=3, z_dim=16, w_dim=16, mapping_layers=2,
                     channel_base=256, channel_max=16)


def domain_features():
    """The pipeline's domain feature network (untrained, eval mode) without its 8-bit rounding."""
    torch.manual_seed(1)
    net = FeatureNet(DomainNet(channels=1, resolution=16, num_classes=3, width=4), kind="domain", net_id="t", info={})
    return feature_fn_from_net(net.eval())


def test_feature_fn_skips_the_8bit_rounding():
    torch.manual_seed(1)
    net = FeatureNet(DomainNet(channels=1, resolution=16, num_classes=3, width=4), kind="domain", net_id="t", info={})
    net.eval()
    x = torch.rand(2, 1, 16, 16).mul(255).round() / 127.5 - 1  # on the 8-bit levels
    step = 1e-4 * torch.randn(2, 1, 16, 16)  # far below half a level (1/255): rounding hides it
    assert torch.equal(net(x)[0], net(x + step)[0])
    f = feature_fn_from_net(net)
    assert f(x).shape == (2, 16) and not torch.equal(f(x), f(x + step))


def test_lerp_path_distance_of_a_linear_map_is_the_squared_image_of_the_step():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 8, generator=g, dtype=torch.float64)
    a, b = torch.randn(2, 32, 8, generator=g, dtype=torch.float64)
    t = torch.rand(32, generator=g, dtype=torch.float64)
    d = path_distances(lambda w: (w @ A.T).view(-1, 1, 4, 4), flat, a, b, t, epsilon=1e-4, interp=lerp)
    assert torch.allclose(d, ((b - a) @ A.T).square().sum(1), rtol=1e-8)  # exact for a linear map, any t


def test_slerp_path_distance_is_the_chord_of_the_great_circle():
    # G = s Q z (orthonormal columns) at radius r: the step t -> t + eps covers the angle Omega eps, chord
    # 2 r sin(Omega eps / 2), so d = s^2 (2 r sin(Omega eps / 2))^2 / eps^2 ~ s^2 r^2 Omega^2
    g = torch.Generator().manual_seed(1)
    k, s, eps = 8, 3.0, 1e-4
    Q = orthonormal(16, k, 1)
    a, b = torch.randn(2, 32, k, generator=g, dtype=torch.float64)
    t = torch.rand(32, generator=g, dtype=torch.float64)
    interp = lambda a, b, t: slerp(a, b, t) * math.sqrt(k)  # noqa: E731
    d = path_distances(lambda z: s * (z @ Q.T).view(-1, 1, 4, 4), flat, a, b, t, epsilon=eps, interp=interp)
    omega = torch.acos(torch.nn.functional.cosine_similarity(a, b))
    assert torch.allclose(d, (s * 2 * math.sqrt(k) * torch.sin(omega * eps / 2) / eps).square(), rtol=1e-8)


def test_z_ppl_of_an_isometry_matches_the_angle_distribution():
    # z1, z2 ~ N(0, I_k): the angle Omega between them has density ~ sin^(k-2)(Omega) on (0, pi), and per sample
    # d = s^2 k Omega^2 (previous test), so the trimmed PPL is a 1D integral over Omega's [1%, 99%] quantiles
    k, s, n = 16, 0.5, 4000
    G = LinearG(s * orthonormal(16, k, 2))
    out = ppl(G, space="z", feature_fn=flat, num_samples=n, batch_size=1000, generator=torch.Generator().manual_seed(2))
    omega = torch.linspace(0, math.pi, 200_001, dtype=torch.float64)
    pdf = omega.sin() ** (k - 2)
    cdf = torch.cumulative_trapezoid(pdf, omega)
    cdf = torch.cat([cdf.new_zeros(1), cdf]) / cdf[-1]
    inside = (cdf >= 0.01) & (cdf <= 0.99)
    d = s**2 * k * omega**2
    mean = torch.trapezoid((d * pdf)[inside], omega[inside]) / torch.trapezoid(pdf[inside], omega[inside])
    sd = (torch.trapezoid(d.square() * pdf, omega) / torch.trapezoid(pdf, omega) - mean**2).sqrt()
    assert out["mean"] == pytest.approx(float(mean), abs=5 * float(sd) / math.sqrt(n))


def test_ppl_of_a_constant_generator_is_zero():
    out = ppl(ConstantG(torch.randn(16, 8)), space="z", feature_fn=flat, num_samples=64, batch_size=32)
    assert out["mean"] == 0.0 and out["quantiles"]["0.99"] == 0.0


def test_ppl_scales_with_the_square_of_the_feature_scale():
    G = tiny_stylegan2()
    runs = [ppl(G, space="w", feature_fn=lambda x, c=c: c * x.flatten(1), num_samples=32, batch_size=16,
                generator=torch.Generator().manual_seed(0)) for c in (1.0, 4.0)]
    # c = 4 is a power of two: scaling commutes with float rounding, so the c^2 law holds to the last bit
    assert runs[1]["mean"] == pytest.approx(16 * runs[0]["mean"], rel=1e-12)
    assert runs[1]["median"] == pytest.approx(16 * runs[0]["median"], rel=1e-12)


@pytest.mark.parametrize("space", ["z", "w"])
def test_stylegan2_ppl_plumbing(space):
    G = tiny_stylegan2()
    G.train()
    labels = []

    def label_fn(n, gen):
        labels.append(torch.randint(0, 3, (n,), generator=gen))
        return labels[-1]

    out = ppl(G, space=space, feature_fn=domain_features(), num_samples=40, batch_size=16,
              generator=torch.Generator().manual_seed(0), label_fn=label_fn)
    assert math.isfinite(out["mean"]) and out["mean"] > 0 and out["quantiles"]["0.01"] > 0
    assert [len(y) for y in labels] == [16, 16, 8]  # one label per path: both endpoints share it
    assert G.training  # ppl ran in eval mode and restored the mode


def test_trimmed_mean_drops_the_percentile_tails():
    # n = 1000: the 1st percentile is the 10th smallest ('lower'), the 99th the 10th largest ('higher')
    d = torch.cat([torch.ones(982), torch.full((9,), -1e6), torch.full((9,), 1e6)])
    assert float(trimmed_mean(d)) == 1.0
    assert float(trimmed_mean(torch.arange(64.0))) == pytest.approx(31.5)  # n = 64: the 1st/99th are min/max


# ---------------------------------------------------------------- Jacobian diagonality


def test_diagonal_dominance_limits():
    k = 5
    orth = orthonormal(12, k, 3) * torch.tensor([0.1, 1.0, 3.0, 7.0, 0.5], dtype=torch.float64)  # any column scales
    rank_one = torch.randn(12, 1, dtype=torch.float64) @ torch.randn(1, k, dtype=torch.float64)
    e = torch.eye(4, dtype=torch.float64)
    two_equal = torch.stack([e[0], e[0], e[1], e[2]], dim=1)  # rows r = 1/2, 1/2, 1, 1 -> 3/4
    dead = torch.stack([e[0], e[1], torch.zeros(4, dtype=torch.float64)], dim=1)  # a latent with no effect is skipped
    assert diagonal_dominance(orth[None]).item() == pytest.approx(1.0, abs=1e-12)
    assert diagonal_dominance(rank_one[None]).item() == pytest.approx(1 / k, abs=1e-12)
    assert diagonal_dominance(two_equal[None]).item() == pytest.approx(0.75, abs=1e-12)
    assert diagonal_dominance(dead[None]).item() == pytest.approx(1.0, abs=1e-12)


def test_jacobian_diagonality_of_linear_generators():
    k = 6
    g = torch.Generator().manual_seed(4)
    orth = LinearG(orthonormal(16, k, 4) * torch.linspace(0.5, 2.0, k, dtype=torch.float64))
    rank_one = LinearG(torch.randn(16, 1, dtype=torch.float64) @ torch.randn(1, k, dtype=torch.float64))
    assert jacobian_diagonality(orth, space="z", feature_fn=flat, num_points=3, generator=g)["score"] == \
        pytest.approx(1.0, abs=1e-12)
    assert jacobian_diagonality(rank_one, space="z", feature_fn=flat, num_points=3, generator=g)["score"] == \
        pytest.approx(1 / k, abs=1e-12)


@pytest.mark.parametrize("space", ["z", "w"])
def test_stylegan2_jacobian_diagonality_plumbing(space):
    out = jacobian_diagonality(tiny_stylegan2(), space=space, feature_fn=domain_features(), num_points=2,
                               generator=torch.Generator().manual_seed(0))
    assert out["latent_dim"] == 16 and all(1 / 16 - 1e-9 <= s <= 1 + 1e-9 for s in out["per_point"])
