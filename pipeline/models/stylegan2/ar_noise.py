"""Structured per-pixel noise for StyleGAN2: a unit-variance 2D causal (NSHP) AR field instead of white noise.

    x[i, j] = sum_k a_k x[i - di_k, j - dj_k] + e[i, j],    e i.i.d. N(0, 1)

(offsets and fitting: pipeline/diagnostics/noise.py). The field is sampled on a torus: with A(w) = 1 - sum_k a_k
e^{-i w.d_k} on an L1 x L2 frequency grid, x = IFFT(FFT(e) / A) solves the recursion exactly with circular
indexing, i.e. it is white noise filtered by the inverse filter 1/A (the MA(inf) form of the AR, evaluated exactly
on the grid rather than truncated). Cropping H x W out of an (H + AR_PAD) x (W + AR_PAD) torus keeps the recursion
exact inside the crop; the only approximation is the wrap-around: a crop covariance at lag d is
C(d) + C(d - L) + ..., and |d - L| > AR_PAD, so the error is the AR correlation at lag > 64 (<= 0.9^65 ~ 1e-3 for
the most persistent AR this module allows; ~0 for fitted high-pass residual coefficients). Unlike the row
recursion of `sample_ar2d` (H' sequential steps, no autograd), this is one batched FFT pair and differentiable in
the coefficients, so `learn=true` can train them. Dividing by sqrt(mean 1/|A|^2) over the same grid -- exactly
`ar2d_stationary_variance(coeffs, grid=L)` -- gives the field unit variance, so the learned per-channel noise
strength keeps its meaning (it stays the noise's standard deviation).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.diagnostics.noise import Offset, image_ar_report, nshp_offsets

KEY = "model.generator.noise_ar"
NOISE_AR_KEYS = ("order", "coefficients", "learn")
AR_PAD = 64  # torus padding per axis: wrap-around correlations are those at lags > AR_PAD
LEARN_MAX_L1 = 0.9  # learned coefficients stay in sum |a| < 0.9: stable, and short-range enough for AR_PAD
MIN_ABS_A = 1 - LEARN_MAX_L1  # fixed ones need min |A(w)| >= 0.1: spectral density <= 100x that of white noise


@dataclass(frozen=True)
class ARNoiseSpec:
    """A checked `model.generator.noise_ar` block: offsets of the NSHP neighbourhood and their initial values."""

    order: int = 1
    coefficients: tuple[tuple[Offset, float], ...] = ()  # offsets not named are 0
    learn: bool = False

    def initial(self) -> Tensor:
        """(K,) initial coefficients in the order of nshp_offsets(order)."""
        given = dict(self.coefficients)
        return torch.tensor([given.get(o, 0.0) for o in nshp_offsets(self.order)], dtype=torch.float32)


def _parse_offset(key: object) -> Offset:
    """'di,dj' (the config's and image_ar_report's format) or a (di, dj) tuple -> (di, dj)."""
    try:
        parts = key.split(",") if isinstance(key, str) else list(key)
        di, dj = (int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{KEY}.coefficients key {key!r} is not an offset 'di,dj' (e.g. '0,1')") from None
    return di, dj


def check_noise_ar(noise_ar: Mapping | None) -> ARNoiseSpec:
    """Validate a `noise_ar` block (a dict or DictConfig); errors name the key that fixes them."""
    if noise_ar is None:
        return ARNoiseSpec()
    unknown = [k for k in noise_ar if k not in NOISE_AR_KEYS]
    if unknown:
        raise ValueError(f"{KEY}.{unknown[0]} is not a known key (known: {', '.join(NOISE_AR_KEYS)})")
    order, learn = noise_ar.get("order", 1), noise_ar.get("learn", False)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"{KEY}.order={order!r} must be an integer >= 1")
    if not isinstance(learn, bool):
        raise ValueError(f"{KEY}.learn={learn!r} must be true or false")
    raw = noise_ar.get("coefficients") or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{KEY}.coefficients must be null or a mapping {{'di,dj': a}}, got {raw!r}")
    allowed = set(nshp_offsets(order))
    coefficients = {}
    for key, value in raw.items():
        offset = _parse_offset(key)
        if offset not in allowed:
            raise ValueError(f"{KEY}.coefficients offset {offset} is not in the causal (NSHP) neighbourhood of "
                             f"order {order}: need di > 0, or di == 0 and dj > 0, and |di|, |dj| <= order "
                             f"(raise {KEY}.order for farther offsets)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{KEY}.coefficients[{key!r}]={value!r} must be a finite number")
        coefficients[offset] = float(value)
    spec = ARNoiseSpec(order=order, coefficients=tuple(sorted(coefficients.items())), learn=learn)
    if learn:  # they must start inside the region their parametrization (l1_ball) can reach
        l1 = sum(abs(a) for a in coefficients.values())
        if l1 >= LEARN_MAX_L1:
            raise ValueError(f"{KEY}.coefficients have sum |a| = {l1:.3f}; it must be < {LEARN_MAX_L1} with learn=true")
    else:
        # The torus sampler needs A(w) != 0 (sum |a| < 1 is sufficient, not necessary: the AR fits of high-pass
        # residuals have sum |a| ~ 1.1 and min |A| ~ 0.45); the margin bounds the correlation length for AR_PAD.
        min_abs = float(ar_filter_spectrum(spec.initial().double(), nshp_offsets(order), (256, 256)).abs().min())
        if min_abs < MIN_ABS_A:
            raise ValueError(f"{KEY}.coefficients have min |A(w)| = {min_abs:.3f} < {MIN_ABS_A:.1f} (A(w) = 1 - sum_k "
                             "a_k e^(-i w.d_k)): too close to an unstable or non-stationary AR")
    return spec


def l1_ball(v: Tensor, radius: float) -> Tensor:
    """R^K -> open L1 ball: a = radius v / (1 + ||v||_1). Near 0 it is radius * identity (so init 0 is regular,
    unlike tanh(||v||) v / ||v||), and sum |a| < radius for every v, so no optimizer step can make the AR unstable."""
    return radius * v / (1 + v.abs().sum())


def l1_ball_inverse(a: Tensor, radius: float) -> Tensor:
    """Inverse of l1_ball for sum |a| < radius: v = a / (radius - ||a||_1)."""
    return a / (radius - a.abs().sum())


def ar_filter_spectrum(coeffs: Tensor, offsets: list[Offset], size: tuple[int, int]) -> Tensor:
    """A(w) = FFT2 of the filter 1 - sum_k a_k delta_{d_k} on an L1 x L2 torus: complex (L1, L2); differentiable."""
    l1, l2 = size
    idx = torch.tensor([(di % l1) * l2 + dj % l2 for di, dj in offsets], device=coeffs.device)
    h = torch.zeros(l1 * l2, dtype=coeffs.dtype, device=coeffs.device)
    h = h.index_add(0, idx, -coeffs)  # out of place: autograd reaches the coefficients
    h[0] = h[0] + 1.0
    return torch.fft.fft2(h.view(l1, l2))


def ar_torus_field(e: Tensor, coeffs: Tensor, offsets: list[Offset]) -> Tensor:
    """Innovations e (N, L1, L2) -> the unit-variance AR field on the torus, (N, L1, L2).

    x = IFFT(FFT(e) / A) satisfies x - sum_k a_k x[. - d_k] = e with circular indexing (circular convolution by
    the filter is multiplication by A). var(x) = mean_w 1/|A(w)|^2 (Parseval), divided out.
    """
    spectrum = ar_filter_spectrum(coeffs.to(e.dtype), offsets, tuple(e.shape[1:]))  # (L1, L2)
    inv = spectrum.reciprocal()  # 1/A: finite since |A| >= 1 - sum |a| > 0
    var = inv.abs().square().mean()
    return torch.fft.ifft2(torch.fft.fft2(e) * inv).real * var.rsqrt()


class ARNoise(nn.Module):
    """Samples unit-variance NSHP AR noise (N, 1, H, W); coefficients fixed (a buffer) or learned (a parameter)."""

    def __init__(self, spec: ARNoiseSpec) -> None:
        super().__init__()
        self.order, self.learn = spec.order, spec.learn
        self.offsets = nshp_offsets(spec.order)
        if spec.learn:
            self.raw = nn.Parameter(l1_ball_inverse(spec.initial(), LEARN_MAX_L1))
        else:  # not persistent: fixed coefficients come from the config, which checkpoints keep
            self.register_buffer("fixed", spec.initial(), persistent=False)

    def coefficients(self) -> Tensor:
        """(K,) current coefficients, in the order of nshp_offsets(order)."""
        return l1_ball(self.raw, LEARN_MAX_L1) if self.learn else self.fixed

    def coefficient_dict(self) -> dict[str, float]:
        """The coefficients in the config's {'di,dj': a} format."""
        return {f"{di},{dj}": float(a) for (di, dj), a in zip(self.offsets, self.coefficients().detach())}

    def forward(self, n: int, h: int, w: int, *, device: torch.device) -> Tensor:
        coeffs = self.coefficients()
        if not self.learn and not coeffs.any():  # all-zero fixed AR: plain white noise, no FFT
            return torch.randn(n, 1, h, w, device=device)
        e = torch.randn(n, h + AR_PAD, w + AR_PAD, device=device)  # float32 even under autocast: FFT precision
        return ar_torus_field(e, coeffs.float(), self.offsets)[:, None, :h, :w]

    def extra_repr(self) -> str:
        return f"order={self.order}, learn={self.learn}"


def _load_images(shard_dir: str | Path, max_images: int) -> Tensor:
    """The first max_images images of a gan-shards dataset as (N, C, H, W) in [-1, 1]."""
    from pipeline.data.shards import iterate_shards  # data reading only for this helper, not for the model

    images = []
    for _, pixels, _ in iterate_shards(shard_dir):
        x = torch.from_numpy(pixels).float() / 127.5 - 1  # (H, W) or (H, W, 3)
        images.append(x[None] if x.ndim == 2 else x.permute(2, 0, 1))
        if len(images) >= max_images:
            break
    if not images:
        raise ValueError(f"no images in {shard_dir}")
    return torch.stack(images)


def fit_noise_ar(source: str | Path | Tensor, order: int = 1, *, max_images: int = 2048,
                 highpass_kind: str = "box3") -> dict[str, float]:
    """AR(order) coefficients of the data's high-pass residuals in `noise_ar.coefficients` format {'di,dj': a}.

    source: a gan-shards folder, or images (N, C, H, W) in [-1, 1]. The residuals are the box3 high-pass of the
    8-bit images (image_ar_report), which itself correlates neighbours a little: the fit describes the residual
    texture, not a sensor noise model (white noise fits to all four order-1 coefficients ~ -0.27). Raises
    if the fit fails check_noise_ar (min |A(w)| < 0.1).
    """
    images = source if isinstance(source, Tensor) else _load_images(source, max_images)
    coefficients = image_ar_report(images, order=order, highpass_kind=highpass_kind)["coefficients"]
    check_noise_ar({"order": order, "coefficients": coefficients})
    return coefficients
