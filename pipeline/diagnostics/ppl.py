"""Perceptual path length (StyleGAN, Karras et al. 2019, sec. 4.1) and a Jacobian diagonality score, in Z and W.

PPL = E_{z1, z2, y, t ~ U(0, 1)} [ d(G(interp(z1, z2; t)), G(interp(z1, z2; t + eps))) / eps^2 ]   (paper eq. 2, 3)

Z space: slerp between z1, z2 (eq. 2); W space (StyleGAN2 only): lerp between w1 = mapping(z1, y) and
w2 = mapping(z2, y), rendered by G.synthesis (eq. 3). Both endpoints share the class label y. As in the paper's
code, eps = 1e-4, the generator's noise is held fixed (noise_mode "const") so that d sees only the latent's
effect, and samples outside the [1st, 99th] percentiles of d are discarded before averaging.

d: the paper uses LPIPS (VGG16 features), which is not available offline; here d is the squared Euclidean
distance between the features of a pluggable feature_fn (images (N, C, H, W) -> (N, D)), e.g. the pipeline's
feature network (feature_fn_from_net). Values are therefore comparable between models only under the same
feature_fn, and are not comparable with published LPIPS-based PPL numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.diagnostics.modes import eval_mode
from pipeline.metrics.features import FeatureNet

FeatureFn = Callable[[Tensor], Tensor]  # images (N, C, H, W) -> features (N, D)
LabelFn = Callable[[int, torch.Generator | None], Tensor | None]
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def feature_fn_from_net(net: FeatureNet) -> FeatureFn:
    """The features of a FeatureNet without its 8-bit rounding: a 1e-4 step would otherwise round to the same
    levels (d = 0) or jump a whole level (d ~ 1/eps^2), and rounding has zero gradient for the Jacobian score."""
    def features(x: Tensor) -> Tensor:
        out = net.net(x)
        return out[0] if isinstance(out, tuple) else out  # a domain network also returns logits
    return features


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of the directions of a, b (N, k) at t (N, 1), as StyleGAN's PPL code; unit norm."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    d = (a * b).sum(dim=-1, keepdim=True)  # cos(angle)
    c = b - d * a  # the part of b orthogonal to a
    c = c / c.norm(dim=-1, keepdim=True)
    p = t * torch.acos(d)
    out = a * torch.cos(p) + c * torch.sin(p)
    return out / out.norm(dim=-1, keepdim=True)


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """a + t (b - a); t broadcasts against a (N, ...)."""
    return a + t.view(-1, *([1] * (a.ndim - 1))) * (b - a)


def path_distances(render: Callable[[Tensor], Tensor], feature_fn: FeatureFn, a: Tensor, b: Tensor, t: Tensor,
                   *, epsilon: float, interp: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """Per-sample d(f(render(interp(t))), f(render(interp(t + eps)))) / eps^2, d = squared L2: (N,)."""
    t = t.view(-1, *([1] * (a.ndim - 1)))
    x = render(torch.cat([interp(a, b, t), interp(a, b, t + epsilon)]))  # (2N, C, H, W)
    f0, f1 = feature_fn(x).flatten(1).chunk(2)  # each (N, D)
    return (f1 - f0).square().sum(1) / epsilon**2


def trimmed_mean(d: Tensor, lo: float = 0.01, hi: float = 0.99) -> Tensor:
    """Mean of d within its [lo, hi] percentiles, inclusive, with numpy's 'lower'/'higher' interpolation (as the
    paper's code): drops the rare near-singular paths (e.g. across a mode boundary) that dominate a plain mean."""
    s, _ = d.sort()
    n = len(s)
    low, high = s[math.floor(lo * (n - 1))], s[math.ceil(hi * (n - 1))]
    return d[(d >= low) & (d <= high)].mean()


def default_labels(G: nn.Module) -> LabelFn:
    """Uniform class labels for a conditional G (num_classes > 0), None for an unconditional one."""
    k = int(getattr(G, "num_classes", 0))
    return lambda n, gen: torch.randint(0, k, (n,), generator=gen, device=_device(G)) if k > 0 else None


def _device(G: nn.Module) -> torch.device:
    return next(G.parameters()).device


def _dtype(G: nn.Module) -> torch.dtype:
    p = next(G.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _ppl_batch(G: nn.Module, space: str, feature_fn: FeatureFn, n: int, epsilon: float,
               generator: torch.Generator | None, label_fn: LabelFn) -> Tensor:
    """(n,) path distances for fresh endpoints z1, z2 ~ N(0, I), a shared label, t ~ U(0, 1)."""
    kw = dict(device=_device(G), dtype=_dtype(G))
    z1, z2 = torch.randn(2, n, G.z_dim, generator=generator, **kw)
    t = torch.rand(n, generator=generator, **kw)
    y = label_fn(n, generator)
    if space == "z":
        # slerp moves on the unit sphere; scaling to radius sqrt(z_dim), the typical norm of N(0, I), keeps a G
        # that does not normalize z (BigGAN) on its training distribution (StyleGAN2's mapping is scale-invariant).
        interp = lambda a, b, s: slerp(a, b, s) * math.sqrt(G.z_dim)  # noqa: E731
        y2 = None if y is None else torch.cat([y, y])
        return path_distances(lambda z: G(z, y2), feature_fn, z1, z2, t, epsilon=epsilon, interp=interp)
    w1, w2 = G.mapping(torch.cat([z1, z2]), None if y is None else torch.cat([y, y])).chunk(2)  # (n, num_ws, w_dim)
    return path_distances(G.render, feature_fn, w1, w2, t, epsilon=epsilon, interp=lerp)


@torch.no_grad()
def ppl(G: nn.Module, *, space: str = "z", feature_fn: FeatureFn, num_samples: int = 10_000, epsilon: float = 1e-4,
        batch_size: int = 64, generator: torch.Generator | None = None, label_fn: LabelFn | None = None) -> dict:
    """Perceptual path length of G in `space` ("z": any G(z, y); "w": a StyleGAN2 G with mapping/synthesis).

    Returns mean (the paper's PPL: trimmed to the [1, 99] percentiles), mean_untrimmed, median, and per-sample
    quantiles. G runs in eval mode without truncation; evaluate in float32 or float64 (the 1e-4 step needs it).
    """
    if space not in ("z", "w"):
        raise ValueError(f"space={space!r} must be 'z' or 'w'")
    if space == "w" and not hasattr(G, "mapping"):
        raise ValueError(f"space='w' needs a G with mapping and synthesis (StyleGAN2), not {type(G).__name__}")
    label_fn = label_fn or default_labels(G)
    with eval_mode(G):
        d = torch.cat([_ppl_batch(G, space, feature_fn, min(batch_size, num_samples - i), epsilon, generator, label_fn)
                       for i in range(0, num_samples, batch_size)]).double().cpu()
    q = torch.quantile(d, torch.tensor(QUANTILES, dtype=d.dtype))  # linear interpolation between order statistics
    return {"space": space, "epsilon": epsilon, "num_samples": num_samples, "mean": float(trimmed_mean(d)),
            "mean_untrimmed": float(d.mean()), "median": float(torch.quantile(d, 0.5)),
            "quantiles": {str(k): float(v) for k, v in zip(QUANTILES, q)}}


def diagonal_dominance(J: Tensor, *, rel_eps: float = 1e-12) -> Tensor:
    """J (N, D, k) -> per-point score (N,) in [1/k, 1] of the pulled-back metric M = J^T J (k x k).

    C_ij = |M_ij| / sqrt(M_ii M_jj) (|cosine| between the feature-space effects of latents i and j; the scale of
    each latent drops out), r_i = C_ii^2 / sum_j C_ij^2 = 1 / sum_j C_ij^2 (diagonal energy / row energy), and
    the score is the mean of r_i over latents. 1 iff the columns of J are orthogonal (M diagonal: each latent
    axis moves the features in its own direction); 1/k for rank one (every axis moves them along one line).
    Latents with M_ii <= rel_eps * max_i M_ii (no effect at all, e.g. the radial direction of z, which the
    mapping normalizes away) are left out of the mean.
    """
    M = J.transpose(1, 2) @ J  # (N, k, k)
    diag = M.diagonal(dim1=1, dim2=2)  # (N, k)
    active = diag > rel_eps * diag.amax(1, keepdim=True)
    s = diag.clamp_min(torch.finfo(M.dtype).tiny).sqrt()
    C = M.abs() / (s.unsqueeze(2) * s.unsqueeze(1))  # (N, k, k)
    C = C * (active.unsqueeze(2) & active.unsqueeze(1))
    r = 1 / C.square().sum(2).clamp_min(1.0)  # (N, k); C_ii = 1 for active latents, so the sum is >= 1
    return (r * active).sum(1) / active.sum(1)


def latent_jacobian(render: Callable[[Tensor], Tensor], feature_fn: FeatureFn, u: Tensor) -> Tensor:
    """J (N, D, k) = d feature_fn(render(u)) / du at each of the points u (N, k), by forward mode (k passes).

    Differentiates the batch sum: valid because samples do not interact in eval mode (no batch statistics).
    """
    J = torch.func.jacfwd(lambda v: feature_fn(render(v)).flatten(1).sum(0))(u)  # (D, N, k)
    return J.permute(1, 0, 2)


def jacobian_diagonality(G: nn.Module, *, space: str = "w", feature_fn: FeatureFn, num_points: int = 16,
                         generator: torch.Generator | None = None, label_fn: LabelFn | None = None) -> dict:
    """Diagonal dominance of J^T J at random points, J = d features / d latent, in Z or W (see diagonal_dominance).

    W: the Jacobian w.r.t. one w (N, w_dim) broadcast to every synthesis layer, at w = mapping(z, y). StyleGAN's
    claim is that the mapping network unwarps Z so that factors of variation become more linear (sec. 4), and
    StyleGAN2's path length regularizer (eq. 4) drives J_w^T J_w towards a multiple of I, which scores 1 here;
    the isotropic prior leaves Z's axes arbitrary, so the expectation is a higher score in W than in Z. The score
    is basis-dependent: it measures axis alignment, so compare Z and W of one G rather than across models.
    """
    if space not in ("z", "w"):
        raise ValueError(f"space={space!r} must be 'z' or 'w'")
    label_fn = label_fn or default_labels(G)
    kw = dict(device=_device(G), dtype=_dtype(G))
    with eval_mode(G):
        z = torch.randn(num_points, G.z_dim, generator=generator, **kw)
        y = label_fn(num_points, generator)
        if space == "z":
            J = latent_jacobian(lambda v: G(v, y), feature_fn, z)
        else:
            with torch.no_grad():
                w = G.mapping(z, y)[:, 0]  # (N, w_dim): every layer's w is the same before truncation/mixing
            J = latent_jacobian(lambda v: G.render(v.unsqueeze(1).repeat(1, G.num_ws, 1)), feature_fn, w)
    scores = diagonal_dominance(J.detach().double())
    return {"space": space, "latent_dim": J.shape[2], "score": float(scores.mean()), "min_possible": 1 / J.shape[2],
            "per_point": [float(s) for s in scores]}
