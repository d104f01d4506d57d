"""StyleGAN2 regularizers and schedules: R1, path length, lazy regularization, EMA half-life."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.regularizers import path_length_penalty, r1_penalty
from pipeline.training.ema import EMAHalfLife, ema_beta
from pipeline.training.lazy import LazyRegularization, r1_gamma_heuristic

# ---------------------------------------------------------------------------------------------- R1


def test_r1_of_a_linear_d_is_the_squared_weight_norm():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * a).flatten(1).sum(1) + 0.7  # D(x) = <a, x> + b: grad_x D = a for every sample
    assert r1_penalty(logits, x).item() == pytest.approx(a.square().sum().item(), rel=1e-5)
    # (N, 1) logits, as many discriminators return them, give the same value.
    logits = (x * a).flatten(1).sum(1, keepdim=True) + 0.7
    assert r1_penalty(logits, x).item() == pytest.approx(a.square().sum().item(), rel=1e-5)


def test_r1_of_a_quadratic_d_is_the_mean_squared_input_norm():
    torch.manual_seed(1)
    x = torch.randn(6, 2, 3, 3, requires_grad=True)
    logits = 0.5 * x.square().flatten(1).sum(1)  # grad_x D(x_i) = x_i: per-sample, then averaged
    expected = x.detach().square().flatten(1).sum(1).mean()
    assert r1_penalty(logits, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_r1_is_differentiable_in_d_parameters():
    torch.manual_seed(2)
    a = torch.randn(2, 3, 3, requires_grad=True)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    penalty = r1_penalty((x * a).flatten(1).sum(1), x)  # = ||a||^2, so d/da = 2a
    (grad_a,) = torch.autograd.grad(penalty, a)
    assert torch.allclose(grad_a, 2 * a.detach(), atol=1e-6)


def test_r1_without_requires_grad_raises():
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.flatten(1).sum(1), x)


# -------------------------------------------------------------------------------------- path length


def _linear_generator(ws: torch.Tensor, M: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """img = (mean over layers of ws) @ M, as a one-channel image: (N, L, D) -> (N, 1, H, W)."""
    return (ws.mean(1) @ M).view(ws.shape[0], 1, H, W)


def test_path_length_of_a_linear_generator_matches_the_analytic_value():
    # With img = mean_l(w_l) @ M, grad_{w_l} <img, y> = M y / L for every layer l, so
    #   length = sqrt(mean_l sum_d (M y / L)_d^2) = ||M y|| / L.
    # y ~ N(0, I / HW) gives E[length^2] = trace(M M^T) / (HW L^2). Taking M = c Q^T with Q (HW, D)
    # orthonormal columns, Q^T y ~ N(0, I_D / HW), so length = c chi_D / (L sqrt(HW)) and
    #   E[length] = c sqrt(2) Gamma((D + 1) / 2) / Gamma(D / 2) / (L sqrt(HW)).
    N, L, D, H, W, c = 20000, 4, 8, 8, 8, 3.0
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(H * W, D, generator=gen, dtype=torch.float64))
    M = c * Q.T  # (D, HW)
    ws = torch.randn(N, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    _, _, lengths = path_length_penalty(
        _linear_generator(ws, M, H, W), ws, torch.zeros((), dtype=torch.float64), generator=gen
    )
    mean_sq = torch.trace(M @ M.T).item() / (H * W * L**2)
    chi_mean = math.sqrt(2) * math.exp(math.lgamma((D + 1) / 2) - math.lgamma(D / 2))  # E[chi_D]
    mean_len = c * chi_mean / (L * math.sqrt(H * W))
    # Standard errors: length^2 ~ chi2_D scaled, rel. sd sqrt(2/D) / sqrt(N) = 0.35%; 2% is > 5 sigma.
    assert lengths.square().mean().item() == pytest.approx(mean_sq, rel=0.02)
    assert lengths.mean().item() == pytest.approx(mean_len, rel=0.02)


def test_path_lengths_equal_explicit_jacobian_transpose_products():
    torch.manual_seed(3)
    N, L, D, C, H, W = 3, 2, 5, 2, 3, 4
    weight = torch.randn(L * D, C * H * W, dtype=torch.float64) / 3

    def G(ws: torch.Tensor) -> torch.Tensor:  # a nonlinear, per-sample generator
        return torch.tanh(ws.flatten(1) @ weight).view(-1, C, H, W)

    ws = torch.randn(N, L, D, dtype=torch.float64, requires_grad=True)
    _, _, lengths = path_length_penalty(
        G(ws), ws, torch.zeros((), dtype=torch.float64), generator=torch.Generator().manual_seed(7)
    )
    y = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = y / math.sqrt(H * W)  # the same draw as inside path_length_penalty
    for i in range(N):
        J = torch.autograd.functional.jacobian(lambda w: G(w[None])[0], ws[i].detach())  # (C, H, W, L, D)
        jty = torch.einsum("chwld,chw->ld", J, y[i])
        assert lengths[i].item() == pytest.approx(jty.square().sum(1).mean().sqrt().item(), rel=1e-10)


def test_path_length_running_mean_and_penalty_arithmetic():
    torch.manual_seed(4)
    M = torch.randn(6, 16, requires_grad=True)  # G's parameter: the penalty depends on it
    ws = torch.randn(8, 3, 6, requires_grad=True)
    a = torch.tensor(0.37)
    penalty, new_mean, lengths = path_length_penalty(_linear_generator(ws, M, 4, 4), ws, a, decay=0.01)
    assert new_mean.item() == (a + 0.01 * (lengths.mean() - a)).item()  # a' = a + decay (E[len] - a)
    assert penalty.item() == ((lengths - new_mean) ** 2).mean().item()
    assert not new_mean.requires_grad and not lengths.requires_grad and penalty.requires_grad
    assert a.item() == pytest.approx(0.37)  # the caller's running mean is not updated in place


def test_path_length_penalty_is_differentiable_in_generator_parameters():
    # Finite differences against the double backward (create_graph); they also see a' move with the
    # lengths, so this checks that gradient flows through a' as in the NVlabs implementations.
    torch.manual_seed(5)
    weight = (torch.randn(2 * 3, 1 * 2 * 2, dtype=torch.float64) / 2).requires_grad_(True)
    ws = torch.randn(4, 2, 3, dtype=torch.float64)

    def penalty_of(weight: torch.Tensor) -> torch.Tensor:  # same noise on every call
        w = ws.clone().requires_grad_(True)
        img = torch.tanh(w.flatten(1) @ weight).view(4, 1, 2, 2)
        a = torch.tensor(0.1, dtype=torch.float64)
        return path_length_penalty(img, w, a, generator=torch.Generator().manual_seed(0))[0]

    assert torch.autograd.gradcheck(penalty_of, (weight,))


def test_path_length_input_checks():
    ws = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="requires_grad"):
        path_length_penalty(torch.randn(2, 1, 2, 2), ws, torch.zeros(()))
    with pytest.raises(ValueError, match="ws"):
        path_length_penalty(torch.randn(2, 4), ws.requires_grad_(True), torch.zeros(()))


# --------------------------------------------------------------------------------------------- lazy


def test_lazy_due_pattern_and_scale():
    r1 = LazyRegularization(interval=16, weight=0.05)
    assert [s for s in range(48) if r1.due(s)] == [0, 16, 32]
    assert r1.enabled and r1.scale == pytest.approx(0.05 * 16)


def test_lazy_adam_adjustment():
    lr, (b1, b2) = LazyRegularization(interval=16, weight=1.0).adjust_adam(0.0025, (0.0, 0.99))
    assert lr == pytest.approx(0.0025 * 16 / 17, rel=1e-12)
    assert b1 == 0.0 and b2 == pytest.approx(0.99 ** (16 / 17), rel=1e-12)


def test_lazy_disabled_is_never_due_and_leaves_adam_unchanged():
    off = LazyRegularization(interval=4, weight=0.0)
    assert not off.enabled and not any(off.due(s) for s in range(12))
    assert off.adjust_adam(0.0025, (0.0, 0.99)) == (0.0025, (0.0, 0.99))


@pytest.mark.parametrize(
    "interval,weight", [(0, 1.0), (-4, 1.0), (None, 1.0), (2.5, 1.0), (True, 1.0), (4, -1.0), (4, float("nan"))]
)
def test_lazy_invalid_values_raise(interval, weight):
    with pytest.raises(ValueError):
        LazyRegularization(interval=interval, weight=weight)


def test_lazy_negative_step_raises():
    with pytest.raises(ValueError):
        LazyRegularization(interval=4, weight=1.0).due(-1)


def test_r1_gamma_heuristic():
    assert r1_gamma_heuristic(256, 64) == pytest.approx(0.2048, rel=1e-12)  # 0.0002 * 65536 / 64
    with pytest.raises(ValueError):
        r1_gamma_heuristic(0, 64)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_half_life_halves_the_initial_weight():
    batch, half_life_kimg = 40, 10.0
    beta = ema_beta(batch_size=batch, half_life_kimg=half_life_kimg, rampup=None, images_seen=0)
    n = round(half_life_kimg * 1000 / batch)  # 250 updates = one half-life
    assert beta**n == pytest.approx(0.5, abs=1e-9)


def test_ema_rampup_caps_the_half_life_early():
    s = EMAHalfLife(half_life_kimg=10.0, rampup=0.05)
    # 10k images seen: half-life min(10000, 0.05 * 10000) = 500 images.
    assert s.beta(32, 10_000) == pytest.approx(0.5 ** (32 / 500), rel=1e-12)
    # 1M images seen: the cap (50k) is above 10 kimg, so the plain half-life applies.
    assert s.beta(32, 1_000_000) == pytest.approx(0.5 ** (32 / 10_000), rel=1e-12)
    assert s.beta(32, 0) == 0.0  # the first update copies G


def test_ema_without_rampup_ignores_images_seen():
    s = EMAHalfLife(half_life_kimg=10.0, rampup=None)
    assert s.beta(32, 0) == s.beta(32, 10**9) == pytest.approx(0.5 ** (32 / 10_000), rel=1e-12)


def test_ema_stylegan2_ada_cifar_setting():
    # StyleGAN2-ADA cifar: batch 64, EMA half-life 500 kimg, no ramp-up.
    beta = EMAHalfLife(half_life_kimg=500.0, rampup=None).beta(64, 12_345)
    assert beta == pytest.approx(0.5 ** (64 / 500_000), rel=1e-12)


@pytest.mark.parametrize("half_life_kimg,rampup", [(0.0, 0.05), (-1.0, None), (10.0, 0.0), (10.0, -0.05)])
def test_ema_half_life_invalid_values_raise(half_life_kimg, rampup):
    with pytest.raises(ValueError):
        EMAHalfLife(half_life_kimg=half_life_kimg, rampup=rampup)


def test_ema_beta_invalid_arguments_raise():
    with pytest.raises(ValueError):
        ema_beta(batch_size=0, half_life_kimg=10.0, rampup=None, images_seen=0)
    with pytest.raises(ValueError):
        ema_beta(batch_size=32, half_life_kimg=10.0, rampup=0.05, images_seen=-1)
