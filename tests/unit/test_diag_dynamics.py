"""Eigenvalues of the linearized training dynamics: Dirac-GAN closed forms, Arnoldi vs. the explicit Jacobian."""

import json
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from pipeline.diagnostics.dynamics import (
    DiracD,
    DiracG,
    FixedBatch,
    arnoldi,
    dirac_batch,
    dirac_field_jacobian,
    dirac_update_eigenvalues,
    dynamics_report,
    jvp_operator,
    ritz,
    state_map,
)
from pipeline.losses.adversarial import hinge_d, hinge_g, logistic_d, logistic_g

F64 = torch.float64
DIRAC = dict(g_loss=logistic_g, d_loss=logistic_d)


def _as_complex(pairs) -> torch.Tensor:
    return torch.tensor([complex(re, im) for re, im in pairs], dtype=torch.complex128)


def _set_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance from a point of `a` to its nearest point of `b`."""
    return (a[:, None] - b[None, :]).abs().min(dim=1).values.max().item()


def _dirac_report(**kw) -> dict:
    return dynamics_report(DiracG(), DiracD(), dirac_batch(), **DIRAC, **kw)


# ---- Dirac-GAN (Mescheder et al. 2018) ---------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_dirac_jacobian_is_identity_plus_lr_times_field(gamma):
    """Explicit update Jacobians at (0, 0): I + diag(lr) A (simultaneous) and J_G J_D (alternating)."""
    lr_g, lr_d = 0.3, 0.2
    A = dirac_field_jacobian(gamma)  # [[0, 1/2], [-1/2, -gamma]] in the repo's logit sign
    kw = dict(**DIRAC, lr_g=lr_g, lr_d=lr_d, r1_gamma=gamma)
    step, x = state_map(DiracG(), DiracD(), dirac_batch(), mode="simultaneous", **kw)
    expected = torch.eye(2, dtype=F64) + torch.diag(torch.tensor([lr_g, lr_d], dtype=F64)) @ A
    torch.testing.assert_close(jacobian(step, x), expected, rtol=0, atol=1e-14)
    step, x = state_map(DiracG(), DiracD(), dirac_batch(), mode="alternating", **kw)
    J_D = torch.tensor([[1.0, 0.0], [lr_d * A[1, 0], 1.0 + lr_d * A[1, 1]]], dtype=F64)  # D step moves psi only
    J_G = torch.tensor([[1.0, lr_g * A[0, 1]], [0.0, 1.0]], dtype=F64)  # G step at the new psi
    torch.testing.assert_close(jacobian(step, x), J_G @ J_D, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["simultaneous", "alternating"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("lr_g, lr_d", [(0.01, 0.01), (0.1, 0.1), (0.5, 0.5), (0.2, 0.04)])
def test_dirac_eigenvalues_match_closed_form(mode, gamma, lr_g, lr_d):
    # n = 2: the Krylov space is invariant after two steps, so the Ritz values are exact up to rounding,
    # eps ||J|| / |mu_1 - mu_2| (>= 0.018 apart here). Avoid a double root (e.g. lr 0.2/0.05 at gamma = 2): J
    # is then a Jordan block and rounding moves its eigenvalues by sqrt(eps) ~ 1e-8.
    report = _dirac_report(lr_g=lr_g, lr_d=lr_d, r1_gamma=gamma, mode=mode)
    closed = dirac_update_eigenvalues(lr_g=lr_g, lr_d=lr_d, gamma=gamma, mode=mode)
    expected = torch.tensor(closed, dtype=torch.complex128)
    got = _as_complex(report["eigenvalues"])
    assert report["iterations"] == 2 and len(got) == 2
    assert _set_distance(got, expected) < 1e-12 and _set_distance(expected, got) < 1e-12
    assert report["radius"] == pytest.approx(expected.abs().max().item(), abs=1e-12)


def test_dirac_closed_forms_at_equal_lr_are_one_plus_lr_lambda():
    # Simultaneous: mu = 1 + h lambda, lambda = (-gamma +- sqrt(gamma^2 - 4 a^2)) / 2, a = f'(0) = 1/2.
    h, gamma, a = 0.1, 0.3, 0.5
    lam = (-gamma + complex(gamma**2 - 4 * a * a) ** 0.5) / 2
    mu = dirac_update_eigenvalues(lr_g=h, lr_d=h, gamma=gamma, mode="simultaneous")
    assert min(abs(m - (1 + h * lam)) for m in mu) < 1e-14


@pytest.mark.parametrize("h", [0.01, 0.1, 1.0, 3.0])
def test_dirac_radius_without_r1_moves_with_lr_as_the_formula_says(h):
    # Simultaneous GD: |1 +- i h a| = sqrt(1 + h^2 a^2) > 1 for every h (unstable); alternating: a rotation,
    # det = 1 and a complex pair while h^2 a^2 < 4, so |mu| = 1 exactly.
    sim = _dirac_report(lr_g=h, lr_d=h, mode="simultaneous")["radius"]
    alt = _dirac_report(lr_g=h, lr_d=h, mode="alternating")["radius"]
    assert sim == pytest.approx(math.sqrt(1 + h * h / 4), abs=1e-12) and sim > 1
    assert alt == pytest.approx(1.0, abs=1e-12)


def test_dirac_r1_radius_crosses_one_at_the_predicted_lr():
    # gamma < 2a: complex pair, |mu|^2 = det. Simultaneous det = 1 - h gamma + h^2 a^2 < 1 iff h < gamma / a^2
    # = 4 gamma; alternating det = 1 - h gamma, so |mu| = sqrt(1 - h gamma) while the pair stays complex.
    gamma = 0.3
    radii = {h: _dirac_report(lr_g=h, lr_d=h, r1_gamma=gamma)["radius"] for h in (0.3, 1.0, 1.1, 1.3, 2.0)}
    for h, r in radii.items():
        assert r == pytest.approx(math.sqrt(1 - h * gamma + h * h / 4), abs=1e-12)
        assert (r < 1) == (h < 4 * gamma)
    for h in (0.1, 0.5, 1.0):
        r = _dirac_report(lr_g=h, lr_d=h, r1_gamma=gamma, mode="alternating")["radius"]
        assert r == pytest.approx(math.sqrt(1 - h * gamma), abs=1e-12)


def test_power_iteration_radius():
    # Without R1 the simultaneous J = rho * rotation is normal: ||J x|| = rho ||x|| for every x, so exact.
    report = _dirac_report(lr_g=0.5, lr_d=0.5, power_iters=20)
    assert report["power_radius"] == pytest.approx(math.sqrt(1 + 0.25**2), rel=1e-12)
    # gamma = 2 > 2a: real eigenvalues mu_1 > mu_2 > 0 (ratio 0.82 at h = 0.1); the growth ||J x_k|| converges
    # like (mu_2/mu_1)^(2k), so averaging over steps 100..200 leaves ~1e-17 of the transient.
    report = _dirac_report(lr_g=0.1, lr_d=0.1, r1_gamma=2.0, power_iters=200)
    mu1 = max(abs(m) for m in dirac_update_eigenvalues(lr_g=0.1, lr_d=0.1, gamma=2.0))
    assert report["power_radius"] == pytest.approx(mu1, rel=1e-10)


# ---- a small real model: Arnoldi against the explicitly formed Jacobian ---------------------------
class _Net(nn.Module):
    """The G(z, y) / D(x, y) contract around an nn.Sequential (y ignored)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def _mlp_game(norm_layers: bool = False) -> tuple[nn.Module, nn.Module, FixedBatch]:
    """2-D points: G 2 -> 8 -> 2 (42 parameters), D 2 -> 16 -> 1 (65): 107 in all, float64."""
    torch.manual_seed(0)
    g_mid = [nn.BatchNorm1d(8)] if norm_layers else []
    d_out = nn.utils.parametrizations.spectral_norm(nn.Linear(16, 1)) if norm_layers else nn.Linear(16, 1)
    G = _Net(nn.Linear(2, 8), *g_mid, nn.Tanh(), nn.Linear(8, 2)).double()
    D = _Net(nn.Linear(2, 16), nn.Tanh(), d_out, nn.Flatten(0)).double()
    batch = FixedBatch(x_real=torch.randn(16, 2, dtype=F64) + 1.0, z=torch.randn(16, 2, dtype=F64))
    return G, D, batch


MLP = dict(g_loss=logistic_g, d_loss=logistic_d, lr_g=0.5, lr_d=0.5)


@pytest.mark.parametrize("mode", ["simultaneous", "alternating"])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_jvp_equals_explicit_jacobian_times_v(mode, gamma):
    G, D, batch = _mlp_game()
    step, x = state_map(G, D, batch, **MLP, r1_gamma=gamma, mode=mode)
    J = jacobian(step, x)  # (107, 107)
    xg = x.clone().requires_grad_(True)
    apply = jvp_operator(step(xg), xg)
    V = torch.randn(x.numel(), 3, dtype=F64)
    for v in V.T:  # the graph is reused: several products from one build
        torch.testing.assert_close(apply(v), J @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["simultaneous", "alternating"])
def test_arnoldi_matches_eigenvalues_of_explicit_jacobian(mode):
    G, D, batch = _mlp_game()
    step, x = state_map(G, D, batch, **MLP, r1_gamma=1.0, mode=mode)
    J = jacobian(step, x)
    true, V = torch.linalg.eig(J)  # (n,), (n, n) with unit columns
    rho = true.abs().max().item()
    xg = x.clone().requires_grad_(True)
    apply = jvp_operator(step(xg), xg)
    v0 = torch.randn(x.numel(), dtype=F64, generator=torch.Generator().manual_seed(1))
    Q, H = arnoldi(apply, v0, 30)
    values, Y, residuals = ritz(H)
    m = H.shape[1]
    torch.testing.assert_close(Q.T @ Q, torch.eye(m + 1, dtype=F64), rtol=0, atol=1e-12)  # reorthogonalized
    # The cheap residual |h_{m+1,m} y_m| equals the true ||J Q y - lambda Q y||.
    X = Q[:, :m].to(torch.complex128) @ Y
    true_res = (J.to(torch.complex128) @ X - X * values).norm(dim=0)
    torch.testing.assert_close(residuals, true_res, rtol=1e-6, atol=1e-12)
    # Bauer-Fike: each Ritz value lies within cond(V) * residual of some eigenvalue of J (||Q y|| = 1).
    dist = (values[:, None] - true[None, :]).abs().min(dim=1).values
    assert bool((dist <= torch.linalg.cond(V).real * residuals + 1e-10).all())
    # After 30 of 107 steps the dominant eigenvalue has converged far below the 1e-4 asked of it.
    assert abs(values[0].abs().item() - rho) / rho < 1e-4
    report = dynamics_report(G, D, batch, **MLP, r1_gamma=1.0, mode=mode, iters=30)
    assert report["radius"] == pytest.approx(rho, rel=1e-4)
    # With n steps the Krylov space is the whole space: every eigenvalue, up to rounding (J's eigenvalues are
    # simple here; their condition numbers are below 1e3, so errors stay near 1e3 * eps * ||J||).
    full = dynamics_report(G, D, batch, **MLP, r1_gamma=1.0, mode=mode, iters=x.numel(), k=x.numel())
    assert _set_distance(_as_complex(full["eigenvalues"]), true) < 1e-8


@pytest.mark.parametrize("params, block", [("D", slice(42, None)), ("G", slice(0, 42))])
def test_param_subset_is_the_frozen_partner_block(params, block):
    # Only one player trains: in the simultaneous step its Jacobian is the diagonal block I - lr H of J.
    G, D, batch = _mlp_game()
    step, x = state_map(G, D, batch, **MLP, mode="simultaneous")
    true = torch.linalg.eigvals(jacobian(step, x)[block, block])
    report = dynamics_report(G, D, batch, **MLP, params=params, iters=200, k=200)
    assert report["num_params"]["state"] == true.numel()
    assert _set_distance(_as_complex(report["eigenvalues"]), true) < 1e-8


def test_buffers_untouched_and_jvp_matches_explicit_jacobian_with_batchnorm_and_spectral_norm():
    G, D, batch = _mlp_game(norm_layers=True)
    G.train(), D.train()  # BatchNorm batch statistics and the spectral-norm power step, as in training
    before = {**G.state_dict(), **{f"D.{k}": v for k, v in D.state_dict().items()}}
    before = {k: v.clone() for k, v in before.items()}
    step, x = state_map(G, D, batch, **MLP, r1_gamma=1.0, mode="alternating")
    J = jacobian(step, x)
    torch.testing.assert_close(jacobian(step, x), J, rtol=0, atol=0)  # every call starts from the same buffers
    report = dynamics_report(G, D, batch, **MLP, r1_gamma=1.0, mode="alternating", iters=x.numel())
    assert report["radius"] == pytest.approx(torch.linalg.eigvals(J).abs().max().item(), rel=1e-8)
    after = {**G.state_dict(), **{f"D.{k}": v for k, v in D.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_biggan_report_is_json_and_jvp_matches_finite_differences():
    from pipeline.models.biggan.discriminator import Discriminator
    from pipeline.models.biggan.generator import Generator

    torch.manual_seed(0)
    G = Generator(resolution=8, channels=3, num_classes=3, z_dim=8, ch=2, shared_dim=4, attn_resolutions=())
    D = Discriminator(resolution=8, channels=3, num_classes=3, ch=2, attn_resolutions=())
    G, D = G.double().train(), D.double().train()
    batch = FixedBatch(x_real=torch.randn(4, 3, 8, 8, dtype=F64), z=torch.randn(4, 8, dtype=F64),
                       y_real=torch.tensor([0, 1, 2, 0]), y_fake=torch.tensor([1, 1, 2, 0]))
    kw = dict(g_loss=hinge_g, d_loss=hinge_d, lr_g=1e-2, lr_d=1e-2, r1_gamma=1.0, mode="alternating")
    u_before = [b.clone() for b in D.buffers()]
    report = json.loads(json.dumps(dynamics_report(G, D, batch, **kw, iters=8, k=4)))
    assert report["num_params"]["state"] == report["num_params"]["G"] + report["num_params"]["D"] > 4000
    assert len(report["eigenvalues"]) == 4 and report["iterations"] == 8
    assert all(torch.equal(a, b) for a, b in zip(u_before, D.buffers(), strict=True))
    # Central differences: error O(eps^2 F''') + O(1e-16 / eps) ~ 1e-10 relative at eps = 1e-6, small enough
    # not to cross a ReLU or hinge kink (at eps = 1e-5 this tiny model already crosses one). This holds only
    # because spectral norm's power step is frozen: with it, J v missed du/dW and was 1% off.
    step, x = state_map(G, D, batch, **kw)
    v = torch.randn(x.numel(), dtype=F64)
    xg = x.clone().requires_grad_(True)
    jv = jvp_operator(step(xg), xg)(v)
    eps = 1e-6
    fd = (step(x + eps * v) - step(x - eps * v)) / (2 * eps)
    assert ((jv - fd).norm() / jv.norm()).item() < 1e-8
    assert all(m.training for m in D.modules())  # the frozen spectral norms are back in train mode
