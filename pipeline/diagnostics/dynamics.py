"""Eigenvalues of the linearized GAN training dynamics (Mescheder et al. 2017, "The Numerics of GANs").

One training step is a map F(theta, phi) -> (theta', phi') of G's and D's flat parameter vectors. A fixed
point attracts the iteration if every eigenvalue of F's Jacobian J there has |lambda| < 1, and repels it along
any eigenvalue with |lambda| > 1 (Mescheder et al. 2017, sec. 3). J is not symmetric, so the eigenvalues are
complex; we find the largest ones by Arnoldi iteration on the operator v -> J v, never forming J (P x P).

J v comes from the double-backward trick: F is built once with create_graph, then u -> J^T u is a
vector-Jacobian product that is linear in u, and d<J^T u, v>/du = J v. Cost per J v: one backward pass
through the graph of J^T u, i.e. about two to three gradient evaluations of the losses (which already
contain a backward pass, plus R1's input gradient), one for each Arnoldi or power step. Forward mode
(torch.func.jvp) cannot be used: it does not compose with the torch.autograd.grad calls inside F (R1 does one).

Buffers: the modules run in their current mode (train mode: batch-statistic BatchNorm, differentiated as in the
training step), except spectral norm, whose power iteration is frozen at the stored u, v (`spectral_norm_frozen`),
so that F is a function of the weights alone. Every call gets *clones* of the buffers through functional_call,
so running statistics and spectral-norm u vectors of the real modules are never mutated.
The graph of F is built once per report, so random draws inside G (StyleGAN2 noise) are frozen for all J v.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import _SpectralNorm

from pipeline.losses.adversarial import DLoss, GLoss
from pipeline.losses.regularizers import r1_penalty

MODES = ("simultaneous", "alternating")
PARAM_SETS = ("GD", "G", "D")
LinearOp = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FixedBatch:
    """The batch every evaluation of F uses: reals, fixed latents and labels (None: unconditional)."""

    x_real: Tensor  # (N, C, H, W) or (N, features)
    z: Tensor  # (N, z_dim)
    y_real: Tensor | None = None  # (N,)
    y_fake: Tensor | None = None  # (N,)


# ---- the update map F ------------------------------------------------------------------------
def flat_params(module: nn.Module) -> Tensor:
    """All parameters of `module`, detached and concatenated in named_parameters order: (P,)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _call(module: nn.Module, flat: Tensor, *args: Tensor | None) -> Tensor:
    """module(*args) with its parameters taken from `flat` (views, so gradients reach `flat`).

    Buffers are cloned on every call: in-place updates (BatchNorm running stats, the spectral-norm u of
    torch's parametrization in train mode) land on the clones and every call sees the same snapshot.
    """
    tensors: dict[str, Tensor] = {name: b.clone() for name, b in module.named_buffers()}
    offset = 0
    for name, p in module.named_parameters():
        tensors[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, {type(module).__name__} has {offset} parameters")
    return functional_call(module, tensors, args)


@contextmanager
def spectral_norm_frozen(*modules: nn.Module) -> Iterator[None]:
    """Spectral-norm parametrizations in eval mode (sigma = u^T W v at the stored u, v); everything else as is.

    In train mode torch's parametrization first takes a power step u <- W v / ||W v|| without gradient, so u
    depends on W but autograd treats it as a constant: J v would then miss du/dW and differ from the derivative
    of F (by ~1% on a tiny BigGAN). With u, v fixed, F is a function of the weights alone and J v is exact;
    the price is that F skips that one power step (negligible once u has converged during training).
    """
    frozen = [m for module in modules for m in module.modules() if isinstance(m, _SpectralNorm) and m.training]
    for m in frozen:
        m.training = False
    try:
        yield
    finally:
        for m in frozen:
            m.training = True


def _grad(loss: Tensor, wrt: Tensor) -> Tensor:
    """d loss / d wrt, kept differentiable (create_graph) so that F's Jacobian can be taken."""
    (g,) = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
    return torch.zeros_like(wrt) if g is None else g


def _fresh(t: Tensor) -> Tensor:
    """A new node equal to t to take a partial gradient at: a copy in t's graph, or a new leaf if t has none."""
    return t.clone() if t.requires_grad else t.detach().requires_grad_(True)


def d_objective(G: nn.Module, D: nn.Module, theta: Tensor, phi: Tensor, batch: FixedBatch, *, d_loss: DLoss,
                r1_gamma: float = 0.0) -> Tensor:
    """D's loss L_D(theta, phi) + gamma/2 R1 (Mescheder et al. 2018, eq. 9), as in GAN.training_step.

    Unlike the training step the fakes are *not* detached: dL_D/dphi depends on theta through G(z), and
    that dependence is the coupling block d(grad_phi L_D)/d theta of the Jacobian.
    """
    x_real = batch.x_real.detach().requires_grad_(r1_gamma > 0)
    d_real = _call(D, phi, x_real, batch.y_real)  # (N,)
    d_fake = _call(D, phi, _call(G, theta, batch.z, batch.y_fake), batch.y_fake)  # (N,)
    loss = d_loss(d_real, d_fake)
    if r1_gamma > 0:
        loss = loss + 0.5 * r1_gamma * r1_penalty(d_real, x_real)
    return loss


def g_objective(G: nn.Module, D: nn.Module, theta: Tensor, phi: Tensor, batch: FixedBatch, *,
                g_loss: GLoss) -> Tensor:
    """G's loss L_G(theta, phi) = g_loss(D(G(z)))."""
    return g_loss(_call(D, phi, _call(G, theta, batch.z, batch.y_fake), batch.y_fake))


def update_map(G: nn.Module, D: nn.Module, theta: Tensor, phi: Tensor, batch: FixedBatch, *, g_loss: GLoss,
               d_loss: DLoss, lr_g: float, lr_d: float, r1_gamma: float = 0.0,
               mode: str = "simultaneous") -> tuple[Tensor, Tensor]:
    """One gradient-descent step of the game, F(theta, phi) -> (theta', phi'), each player minimizing its loss.

    simultaneous: theta' = theta - lr_g grad_theta L_G(theta, phi),  phi' = phi - lr_d grad_phi L_D(theta, phi).
    alternating:  phi' as above, then theta' = theta - lr_g grad_theta L_G(theta, phi') (D steps first, as in
    GAN.training_step). lr = 0 freezes a player (no gradient is taken). The result is differentiable in
    theta and phi when they require grad.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # Each gradient is a partial one, taken w.r.t. a fresh copy: in the alternating step phi' depends on theta,
    # and G's step uses grad_theta L_G evaluated at (theta, phi'), not the total derivative through phi'
    # (that would be a one-step unrolled GAN). The copies keep the result differentiable in theta and phi.
    phi_new = phi
    if lr_d:
        phi_d = _fresh(phi)
        phi_new = phi - lr_d * _grad(d_objective(G, D, theta, phi_d, batch, d_loss=d_loss, r1_gamma=r1_gamma), phi_d)
    theta_new = theta
    if lr_g:
        theta_g, phi_seen = _fresh(theta), (phi_new if mode == "alternating" else phi)
        theta_new = theta - lr_g * _grad(g_objective(G, D, theta_g, phi_seen, batch, g_loss=g_loss), theta_g)
    return theta_new, phi_new


def jvp_operator(outputs: Tensor, inputs: Tensor) -> LinearOp:
    """v -> J v for J = d outputs / d inputs (both flat), by double backward; J is never formed.

    J^T u is linear in a dummy u, so grad_u <J^T u, v> = J v. The graph of J^T u is built once and reused
    (retain_graph): each call costs one backward pass through it.
    """
    u = torch.zeros_like(outputs, requires_grad=True)
    (jtu,) = torch.autograd.grad(outputs, inputs, u, create_graph=True)  # (P,), J^T u

    def apply(v: Tensor) -> Tensor:
        (jv,) = torch.autograd.grad(jtu, u, v.to(jtu.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(outputs) if jv is None else jv

    return apply


# ---- Krylov eigenvalue estimates -----------------------------------------------------------------
def arnoldi(apply: LinearOp, v0: Tensor, iters: int, *, tol: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Arnoldi iteration with full reorthogonalization: A Q_m = Q_{m+1} H, H (m+1, m) upper Hessenberg.

    Classical Gram-Schmidt applied twice ("twice is enough", Giraud et al. 2005) keeps Q orthonormal to
    rounding. Stops early when h_{j+1,j} < tol ||A q_j||: the Krylov space is invariant and the Ritz values
    are exact eigenvalues. Returns Q (n, m+1) and H (m+1, m) in float64; one apply per step.
    """
    n = v0.numel()
    Q = torch.zeros(n, iters + 1, dtype=torch.float64, device=v0.device)
    H = torch.zeros(iters + 1, iters, dtype=torch.float64, device=v0.device)
    Q[:, 0] = v0.double() / v0.double().norm()
    for j in range(iters):
        w = apply(Q[:, j].to(v0.dtype)).double()
        scale = w.norm()
        for _ in range(2):  # CGS2
            h = Q[:, :j + 1].T @ w
            w = w - Q[:, :j + 1] @ h
            H[:j + 1, j] += h
        H[j + 1, j] = w.norm()
        if H[j + 1, j] <= tol * max(scale.item(), 1e-300):
            return Q[:, :j + 1], H[:j + 1, :j + 1]  # invariant subspace: H square, exact eigenvalues
        Q[:, j + 1] = w / H[j + 1, j]
    return Q, H


def ritz(H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values, vectors y (in the Krylov basis) and residuals ||A Q y - lambda Q y|| = |h_{m+1,m} y_m|.

    Sorted by |lambda| descending. H is (m+1, m) from `arnoldi`, or (m, m) after an early stop (residual 0).
    """
    m = H.shape[1]
    values, vectors = torch.linalg.eig(H[:m, :m])  # (m,), (m, m) complex, columns unit norm
    beta = H[m, m - 1] if H.shape[0] > m else torch.zeros((), dtype=H.dtype)
    residuals = (beta * vectors[m - 1, :]).abs()  # Saad 2011, ch. 6
    order = torch.argsort(values.abs(), descending=True)
    return values[order], vectors[:, order], residuals[order]


def power_radius(apply: LinearOp, v0: Tensor, iters: int) -> float:
    """Spectral radius by power iteration, as the geometric mean of ||A x_k|| over the last half of the steps.

    Gelfand's formula rho = lim ||A^k||^(1/k). The plain ratio ||A x_k|| / ||x_k|| does not converge when the
    dominant eigenvalues are a complex pair (the usual case here: x_k rotates in their plane), but its
    geometric mean over many steps does, with error O(log(cond) / steps); exact for normal A.
    """
    x = v0.double() / v0.double().norm()
    logs = []
    for _ in range(iters):
        w = apply(x.to(v0.dtype)).double()
        norm = w.norm()
        logs.append(math.log(max(norm.item(), 1e-300)))
        x = w / norm
    tail = logs[len(logs) // 2:]
    return math.exp(sum(tail) / len(tail))


# ---- the report --------------------------------------------------------------------------------
def state_map(G: nn.Module, D: nn.Module, batch: FixedBatch, *, g_loss: GLoss, d_loss: DLoss, lr_g: float,
              lr_d: float, r1_gamma: float = 0.0, mode: str = "simultaneous",
              params: str = "GD") -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """`update_map` on one flat state x -> x' (x = [theta, phi], or theta or phi alone), and x at G's and D's weights.

    params: "GD" both players move; "G" only G trains (D frozen at its weights, lr_d unused); "D" only D trains.
    """
    if params not in PARAM_SETS:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
    theta, phi = flat_params(G), flat_params(D)
    n_g = theta.numel() if "G" in params else 0
    lr_g, lr_d = (lr_g if "G" in params else 0.0), (lr_d if "D" in params else 0.0)

    def step(x: Tensor) -> Tensor:
        theta_in, phi_in = (x[:n_g] if n_g else theta), (x[n_g:] if "D" in params else phi)
        with spectral_norm_frozen(G, D):
            theta_new, phi_new = update_map(G, D, theta_in, phi_in, batch, g_loss=g_loss, d_loss=d_loss,
                                            lr_g=lr_g, lr_d=lr_d, r1_gamma=r1_gamma, mode=mode)
        return torch.cat([theta_new] * ("G" in params) + [phi_new] * ("D" in params))  # (n,)

    return step, torch.cat([theta] * ("G" in params) + [phi] * ("D" in params))


def dynamics_report(G: nn.Module, D: nn.Module, batch: FixedBatch, *, g_loss: GLoss, d_loss: DLoss, lr_g: float,
                    lr_d: float, r1_gamma: float = 0.0, mode: str = "simultaneous", k: int = 6, iters: int = 30,
                    params: str = "GD", power_iters: int = 0, seed: int = 0) -> dict:
    """Leading eigenvalues of the Jacobian of one training step at G's and D's current weights (JSON-able).

    params as in `state_map`. Cost: one forward+backward of the losses with create_graph to build F, then one
    J v per Arnoldi step (`iters`) and per power step (`power_iters`, 0: skipped). `seed` fixes the start vector
    and G's random draws; the global RNG state is restored afterwards (safe inside a training callback).
    """
    step, x = state_map(G, D, batch, g_loss=g_loss, d_loss=d_loss, lr_g=lr_g, lr_d=lr_d, r1_gamma=r1_gamma,
                        mode=mode, params=params)
    x = x.requires_grad_(True)  # (n,)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        apply = jvp_operator(step(x), x)
        v0 = torch.randn(x.numel(), generator=torch.Generator(device=x.device).manual_seed(seed), device=x.device,
                         dtype=x.dtype)
        _, H = arnoldi(apply, v0, min(iters, x.numel()))
        values, _, residuals = ritz(H)
        power = power_radius(apply, v0, power_iters) if power_iters > 0 else None
    return {
        "mode": mode, "params": params, "lr_g": lr_g, "lr_d": lr_d, "r1_gamma": r1_gamma,
        "num_params": {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters()),
                       "state": x.numel()},
        "radius": values.abs().max().item(),
        "eigenvalues": [[v.real.item(), v.imag.item()] for v in values[:k]],  # sorted by |lambda|
        "residuals": [r.item() for r in residuals[:k]],  # ||J Q y - lambda Q y||: 0 once the space is invariant
        "iterations": H.shape[1], "power_radius": power, "power_iterations": power_iters,
    }


# ---- Dirac-GAN (Mescheder et al. 2018, sec. 2.2) -------------------------------------------------
F_PRIME_0 = 0.5  # f'(0) for f(t) = -log(1 + exp(-t)): f'(t) = sigmoid(-t)


class DiracG(nn.Module):
    """G(z) = theta for every z: the generator's distribution is a Dirac at theta."""

    def __init__(self, theta: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta], dtype=dtype))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.theta.expand(z.shape[0], 1)  # (N, 1)


class DiracD(nn.Module):
    """D(x) = psi x: a linear discriminator on the line."""

    def __init__(self, psi: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.psi = nn.Parameter(torch.tensor([psi], dtype=dtype))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return x[:, 0] * self.psi  # (N, 1) -> (N,)


def dirac_field_jacobian(gamma: float = 0.0) -> Tensor:
    """Jacobian A of the gradient field v = -(grad_theta L_G, grad_psi L_D) at the equilibrium (0, 0).

    With the repo's logits (positive on reals: L_D = softplus(-D(0)) + softplus(psi theta) + gamma/2 psi^2,
    L_G = softplus(-psi theta)): A = [[0, f'(0)], [-f'(0), -gamma]]. The paper writes D's sign the other way
    (L = f(psi theta) + f(0), D maximizes): A = [[0, -f'(0)], [f'(0), -gamma]] (2018, sec. 2.2; R1: sec. 4.1);
    the two are similar under psi -> -psi, so the eigenvalues agree:
    lambda^2 + gamma lambda + f'(0)^2 = 0, lambda = (-gamma +- sqrt(gamma^2 - 4 f'(0)^2)) / 2.
    """
    return torch.tensor([[0.0, F_PRIME_0], [-F_PRIME_0, -gamma]], dtype=torch.float64)


def dirac_update_eigenvalues(*, lr_g: float, lr_d: float, gamma: float = 0.0,
                             mode: str = "simultaneous") -> tuple[complex, complex]:
    """Closed-form eigenvalues of the Dirac-GAN update Jacobian at (0, 0): roots of mu^2 - T mu + Delta.

    With a = f'(0) and A as in `dirac_field_jacobian`:
    simultaneous: J = I + diag(lr_g, lr_d) A = [[1, lr_g a], [-lr_d a, 1 - lr_d gamma]],
        T = 2 - lr_d gamma, Delta = 1 - lr_d gamma + lr_g lr_d a^2. For lr_g = lr_d = h, mu = 1 + h lambda;
        without R1 |mu| = sqrt(1 + h^2 a^2) > 1 for every h (2018, sec. 2.2: unstable).
    alternating: J = J_G J_D with J_D = [[1, 0], [-lr_d a, 1 - lr_d gamma]] (D step) and
        J_G = [[1, lr_g a], [0, 1]] (G step at the new psi), T = 2 - lr_d gamma - lr_g lr_d a^2,
        Delta = det J_G det J_D = 1 - lr_d gamma. Without R1 Delta = 1: for lr_g lr_d a^2 < 4 a complex pair
        on the unit circle (a rotation, neither converging nor diverging; 2018, sec. 2.2); with R1 and a complex
        pair |mu| = sqrt(1 - lr_d gamma) < 1.
    """
    a = F_PRIME_0
    if mode == "simultaneous":
        trace, det = 2.0 - lr_d * gamma, 1.0 - lr_d * gamma + lr_g * lr_d * a * a
    elif mode == "alternating":
        trace, det = 2.0 - lr_d * gamma - lr_g * lr_d * a * a, 1.0 - lr_d * gamma
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    disc = cmath.sqrt(trace * trace / 4.0 - det)
    return trace / 2.0 + disc, trace / 2.0 - disc


def dirac_batch(n: int = 4, dtype: torch.dtype = torch.float64) -> FixedBatch:
    """Real data at 0 (the Dirac at the origin); G ignores its latents."""
    return FixedBatch(x_real=torch.zeros(n, 1, dtype=dtype), z=torch.zeros(n, 1, dtype=dtype))
