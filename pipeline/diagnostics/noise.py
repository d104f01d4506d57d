"""Autoregressive statistics of image noise: high-pass residuals, a 2D causal AR(p) fit, and AR field sampling.

Model (a 2D AR on a non-symmetric half-plane, NSHP; Jain, "Fundamentals of Digital Image Processing", sec. 6.9):

    x[i, j] = sum_k a_k x[i - di_k, j - dj_k] + e[i, j],    e ~ N(0, sigma_e^2) i.i.d.

Offsets of order p: the p pixels to the left in the same row, (0, 1..p), and the 2p + 1 pixels in each of the p
rows above, (1..p, -p..p) -- "above and to the left" in raster order, so the recursion can be run row by row.
Order p has p + p(2p + 1) coefficients (4 for p = 1, 12 for p = 2).

Images are compared through high-pass residuals: real images carry sensor/JPEG noise and generated ones carry
the synthesis network's texture (and StyleGAN2's injected noise); their AR fits say how much of that residual is
predictable from its causal neighbours (explained_variance_fraction) and with which spatial pattern.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.metrics.features import to_8bit_grid

Offset = tuple[int, int]
HIGHPASS_KINDS = ("box3", "laplacian")


def nshp_offsets(order: int) -> list[Offset]:
    """The (di, dj) of an NSHP neighbourhood of `order`: left in the row first, then the rows above."""
    if order < 1:
        raise ValueError(f"order={order} must be >= 1")
    left = [(0, dj) for dj in range(1, order + 1)]
    above = [(di, dj) for di in range(1, order + 1) for dj in range(-order, order + 1)]
    return left + above


def ar_order(coefficients: dict[Offset, float]) -> int:
    """Smallest p whose NSHP neighbourhood holds every offset; raises on a non-causal offset."""
    for di, dj in coefficients:
        if not (di > 0 or (di == 0 and dj > 0)):
            raise ValueError(f"offset {(di, dj)} is not causal: need di > 0, or di == 0 and dj > 0")
    return max((max(di, abs(dj)) for di, dj in coefficients), default=0)


def highpass(images: Tensor, kind: str = "box3") -> Tensor:
    """(N, C, H, W) -> residuals (N, C, H - 2, W - 2), computed without padding so edges add no artefacts.

    box3: x - mean of its 3x3 window (removes the local mean; a white field stays nearly white, weight 8/9 at
    the centre). laplacian: x - mean of its 4 neighbours (= -Laplacian / 4; stronger on diagonal structure).
    Either filter correlates neighbouring residuals of white noise a little, so compare real and generated
    images through the same filter rather than reading the coefficients as those of the raw noise.
    """
    if kind == "box3":
        k = -torch.full((3, 3), 1 / 9)
        k[1, 1] += 1
    elif kind == "laplacian":
        k = torch.tensor([[0.0, -0.25, 0.0], [-0.25, 1.0, -0.25], [0.0, -0.25, 0.0]])
    else:
        raise ValueError(f"highpass kind={kind!r} must be one of {HIGHPASS_KINDS}")
    c = images.shape[1]
    weight = k.to(images).expand(c, 1, 3, 3)  # depthwise: each channel filtered alone
    return F.conv2d(images, weight, groups=c)


def ar_design(fields: Tensor, offsets: list[Offset]) -> tuple[Tensor, Tensor]:
    """fields (N, H, W) -> (X (M, K) lagged values, y (M,) targets) over the pixels whose whole neighbourhood
    lies inside the field: rows p..H-1, columns p..W-p-1, so M = N (H - p) (W - 2p)."""
    p = max(max(di, abs(dj)) for di, dj in offsets)
    n, h, w = fields.shape
    if h <= p or w <= 2 * p:
        raise ValueError(f"fields of {h}x{w} are too small for an AR of order {p}")
    y = fields[:, p:, p : w - p]  # (N, H - p, W - 2p)
    cols = [fields[:, p - di : h - di, p - dj : w - p - dj] for di, dj in offsets]  # x[i - di, j - dj]
    return torch.stack(cols, dim=-1).reshape(-1, len(offsets)), y.reshape(-1)


def fit_ar2d(fields: Tensor, *, order: int = 1) -> dict:
    """Least-squares NSHP AR(order) fit to zero-mean fields (N, H, W); no intercept is fitted.

    Returns coefficients {(di, dj): a}, their standard errors (sigma_e^2 (X^T X)^-1, the asymptotic covariance
    of least squares for an AR with i.i.d. innovations), noise_var = RSS / (M - K), field_var = var(y), and
    explained_variance_fraction = 1 - noise_var / field_var. Computed in float64; the design matrix takes
    M K 8 bytes (64 fields of 64x64, order 2: ~23 MB).
    """
    offsets = nshp_offsets(order)
    X, y = ar_design(fields.double(), offsets)  # (M, K), (M,)
    m, k = X.shape
    a = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)  # (K,)
    resid = y - X @ a
    noise_var = resid.square().sum() / (m - k)
    cov = noise_var * torch.linalg.inv(X.T @ X)  # (K, K)
    field_var = y.var()
    return {
        "coefficients": {o: float(v) for o, v in zip(offsets, a)},
        "stderr": {o: float(v) for o, v in zip(offsets, cov.diagonal().sqrt())},
        "noise_var": float(noise_var),
        "field_var": float(field_var),
        "explained_variance_fraction": float(1 - noise_var / field_var),
        "num_equations": m,
    }


def ar2d_stationary_variance(coefficients: dict[Offset, float], *, noise_var: float = 1.0, grid: int = 256) -> float:
    """var(x) of the stationary AR field: sigma_e^2 (2 pi)^-2 int |A(w)|^-2 dw, A(w) = 1 - sum_k a_k e^{-i w.d_k}.

    The integrand is smooth and periodic, so the mean over a grid x grid frequency grid (the FFT of the filter
    1 - sum a_k delta_{d_k}) converges geometrically for a stable AR.
    """
    h = torch.zeros(grid, grid, dtype=torch.float64)
    h[0, 0] = 1.0
    for (di, dj), a in coefficients.items():
        h[di % grid, dj % grid] -= a
    return float(noise_var * (1 / torch.fft.fft2(h).abs().square()).mean())


def _within_row_solver(coefficients: dict[Offset, float], width: int, **kw) -> Tensor:
    """(width, width) matrix S with x_row = b_row @ S solving x_j = sum_k a_(0,k) x_(j-k) + b_j, zero left edge.

    The in-row recursion is (I - T) x = b with T lower-triangular Toeplitz, T[j, j - k] = a_(0,k); S = (I - T)^-T.
    """
    eye = torch.eye(width, **kw)
    t = torch.zeros(width, width, **kw)
    for (di, dj), a in coefficients.items():
        if di == 0 and dj < width:
            t += a * torch.diag(torch.ones(width - dj, **kw), -dj)
    return torch.linalg.solve_triangular(eye - t, eye, upper=False).T


def _above_kernel(coefficients: dict[Offset, float], p: int, **kw) -> Tensor:
    """conv1d weight (1, p, 2p + 1) over the p previous rows (channel c is row i - (p - c)): w[p - di, p - dj] = a."""
    weight = torch.zeros(1, p, 2 * p + 1, **kw)
    for (di, dj), a in coefficients.items():
        if di > 0:
            weight[0, p - di, p - dj] = a
    return weight


@torch.no_grad()
def sample_ar2d(coefficients: dict[Offset, float], shape: tuple[int, int, int], *,
                generator: torch.Generator | None = None, noise_std: float = 1.0, burn_in: int = 32,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """An NSHP AR field (N, H, W) driven by N(0, noise_std^2) innovations, on the generator's device.

    Row-by-row recursion: each row gets the contribution of the p rows above (one conv1d) plus its innovations,
    then the in-row recursion is solved with one precomputed (W', W') triangular inverse (a matmul), so the cost
    is H' sequential steps of O(N W'^2), W' = W + 2 burn_in, H' = H + burn_in (256x256, N = 16: ~0.1 s on a CPU).
    Edges: values outside the generated area are 0, so the field starts from a zero state and is not stationary
    near the top, left and right borders; `burn_in` extra rows above and columns on both sides are generated and
    cropped. Transients decay like rho^distance (rho < 1 for a stable AR; sum |a| < 1 is sufficient), so 32 is
    ample for moderate coefficients. Unstable coefficients make the recursion blow up: that raises.
    """
    n, h, w = shape
    p = ar_order(coefficients)
    device = generator.device if generator is not None else None
    kw = dict(dtype=dtype, device=device)
    hb, wb = h + burn_in, w + 2 * burn_in
    e = torch.randn(n, hb, wb, generator=generator, **kw) * noise_std  # innovations
    if p == 0:
        return e[:, burn_in:, burn_in : burn_in + w]
    solve = _within_row_solver(coefficients, wb, **kw)  # (W', W')
    above = _above_kernel(coefficients, p, **kw)  # (1, p, 2p + 1)
    buf = torch.zeros(n, hb + p, wb + 2 * p, **kw)  # p rows of zeros above, p columns of zeros on each side
    for r in range(p, hb + p):
        b = e[:, r - p] + F.conv1d(buf[:, r - p : r], above).squeeze(1)  # (N, W')
        buf[:, r, p : p + wb] = b @ solve
    out = buf[:, p + burn_in :, p + burn_in : p + burn_in + w]
    if not torch.isfinite(out).all():
        raise ValueError(f"AR coefficients {coefficients} are not stable: the sampled field diverged")
    return out.contiguous()


def image_ar_report(images: Tensor, *, order: int = 1, highpass_kind: str = "box3", quantize: bool = True) -> dict:
    """AR(order) fit to the high-pass residuals of images (N, C, H, W) in [-1, 1], pooled over channels.

    quantize: round to 8-bit levels first, as the metrics do (pipeline.metrics.features.to_8bit_grid), so that
    generated images are not credited with precision that 8-bit real images cannot have. Coefficient keys are
    "di,dj" strings so the report can be written as JSON.
    """
    x = to_8bit_grid(images) if quantize else images
    r = highpass(x.float(), highpass_kind)  # (N, C, H - 2, W - 2)
    pooled = fit_ar2d(r.flatten(0, 1), order=order)
    per_channel = [fit_ar2d(r[:, c], order=order)["explained_variance_fraction"] for c in range(r.shape[1])]
    return {
        "order": order,
        "highpass": highpass_kind,
        "quantized": quantize,
        "residual_std": float(r.std()),
        "coefficients": {f"{di},{dj}": a for (di, dj), a in pooled["coefficients"].items()},
        "stderr": {f"{di},{dj}": s for (di, dj), s in pooled["stderr"].items()},
        "noise_var": pooled["noise_var"],
        "explained_variance_fraction": pooled["explained_variance_fraction"],
        "per_channel_explained_variance_fraction": per_channel,
        "num_equations": pooled["num_equations"],
    }
