"""Spectra of a GAN: singular values of its weights (as matrices and as convolution operators) and the
radial power spectrum of its images.

Weights. SN (Miyato et al. 2018) bounds the top singular value of each weight reshaped to (out, -1);
orthogonal regularization (Brock et al. 2019, eq. 3) pushes the rows of that matrix towards orthogonality.
Both are statements about the reshaped matrix, which is not the linear map a conv layer applies to a feature
map. That map's singular values are given per spatial frequency (Sedghi, Gupta & Long 2019), so both are
reported.

Images. Up-sampling layers leave traces in the high frequencies of generated images that the
azimuthally averaged power spectrum shows (Durall et al. 2020, "Watch your up-convolution"; Dzanic et al.
2020, "Fourier spectrum discrepancies in deep network generated images").
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.diagnostics.modes import eval_mode

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
WINDOWS = (None, "hann")
# Ring powers are clamped here before the log: far below 8-bit quantization noise of images in [-1, 1],
# ((2 / 255)^2 / 12 ~ 5e-6 per pixel), so it only matters for constant (collapsed) images.
POWER_FLOOR = 1e-12

_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)


def _wide(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (SVD and FFT need it); fp32 and fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ---- weights as matrices -----------------------------------------------------------------------------------
def effective_weight(module: nn.Module) -> Tensor | None:
    """The weight the layer applies in forward, oriented (out, in, ...); None for a module without one.

    `module.weight` already applies any parametrization (torch's SN divides by its sigma estimate).
    Equalized-lr layers (pipeline/layers/equalized.py, modulated_conv.py) store N(0, 1) weights and multiply
    by `weight_gain` = lr_mult / sqrt(fan_in) in forward (ProGAN sec. 4.1); that product is returned.
    ModulatedConv2d's per-sample modulation and demodulation (StyleGAN2 eqs. 1, 3) depend on w and are left out.
    ConvTranspose2d stores (in, out/groups, kh, kw); it is transposed to (out/groups, in, kh, kw), the
    orientation torch's SN uses for it (dim=1).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim < 2:
        return None
    gain = getattr(module, "weight_gain", None)
    if gain is not None:  # equalized lr, recognised by its runtime gain
        return weight * gain
    if isinstance(module, nn.ConvTranspose2d):
        return weight.transpose(0, 1)
    return weight if isinstance(module, _LAYERS) else None


def matrix_singular_values(weight: Tensor) -> Tensor:
    """Singular values, descending, of the weight reshaped to (out, in * kh * kw) as SN and OR see it."""
    return torch.linalg.svdvals(_wide(weight).reshape(weight.shape[0], -1))  # (min(out, in * kh * kw),)


# ---- conv weights as operators ----------------------------------------------------------------------------
def dilate_kernel(weight: Tensor, dilation: Sequence[int]) -> Tensor:
    """(..., kh, kw) -> (..., (kh-1) dh + 1, (kw-1) dw + 1) with zeros between taps: a dilated conv as a plain one."""
    dh, dw = dilation
    kh, kw = weight.shape[-2:]
    out = weight.new_zeros(*weight.shape[:-2], (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    out[..., ::dh, ::dw] = weight
    return out


def conv_operator_singular_values(weight: Tensor, n: int) -> Tensor:
    """Per-frequency singular values of a stride-1 circular conv on n x n maps.

    weight (..., O, I, kh, kw) -> (..., n, n, min(O, I)), each frequency's values descending.
    Sedghi, Gupta & Long 2019, Thm. 6: the 2-D DFT block-diagonalizes the (O n^2 x I n^2) operator; the block
    at frequency (u, v) is K^[:, :, u, v] = sum_{a,b} w[:, :, a, b] exp(-2 pi i (u a + v b) / n), the FFT of
    the kernel zero-padded to n x n, and the operator's singular values are the union of the blocks'.
    F.conv2d correlates rather than convolves, and a padding offset shifts the output: that conjugates a
    block or multiplies it by a unit phase, neither of which changes its singular values.
    """
    kh, kw = weight.shape[-2:]
    if kh > n or kw > n:
        raise ValueError(f"kernel {kh}x{kw} does not fit an {n}x{n} feature map; use feature_size >= {max(kh, kw)}")
    blocks = torch.fft.fft2(_wide(weight), s=(n, n))  # (..., O, I, n, n) complex
    return torch.linalg.svdvals(blocks.movedim((-2, -1), (-4, -3)))  # batched over (..., n, n): (..., n, n, r)


def _grouped_kernel(module: nn.Module, weight: Tensor) -> Tensor:
    """Effective conv weight (O or O/g, I/g or I, kh, kw) -> (g, O/g, I/g, kh, kw): one block per group."""
    groups = getattr(module, "groups", 1)
    if isinstance(module, nn.ConvTranspose2d):  # weight was transposed from (I, O/g, ...) to (O/g, I, ...)
        o_g, i = weight.shape[:2]
        return weight.reshape(o_g, groups, i // groups, *weight.shape[2:]).transpose(0, 1)
    o, i_g = weight.shape[:2]
    return weight.reshape(groups, o // groups, i_g, *weight.shape[2:])


def _operator_exactness(module: nn.Module, kh: int, kw: int) -> tuple[bool, str]:
    """Whether the circular stride-1 operator is exactly the layer's conv map, and what it is otherwise.

    kh, kw: the dilated kernel's size; 'same' needs it odd and padded by (k - 1) / 2 on each side.
    """
    if isinstance(module, nn.Conv2d):
        same = tuple(module.padding) == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 == 1 and kw % 2 == 1
        if module.stride == (1, 1) and module.padding_mode == "circular" and same:
            return True, "exact: stride-1 same-size circular conv"
    if isinstance(module, nn.ConvTranspose2d) or getattr(module, "up", 1) > 1 or getattr(module, "down", 1) > 1 \
            or getattr(module, "stride", (1, 1)) != (1, 1):
        # Subsampling is a coordinate projection and zero insertion an isometry (both norm 1), so the resampled
        # conv's sigma_max is at most the stride-1 kernel's sup over continuous frequencies, which the n x n
        # grid approaches from below. StyleGAN2's FIR blur around the resampling is not included.
        return False, "stride-1 circular operator of the kernel; the layer resamples (stride/up/down)"
    # Zero ('same') padding: equal to the circular conv away from the border; the spectra agree as n grows.
    return False, "stride-1 circular operator of the kernel; the layer pads with zeros, not circularly"


def conv_layer_operator(module: nn.Module, weight: Tensor, n: int) -> dict:
    """Operator spectrum of one conv layer on n x n maps: sigma_max, its (n, n) map, and how exact it is."""
    dilation = getattr(module, "dilation", (1, 1))
    kernel = dilate_kernel(_grouped_kernel(module, weight), dilation)  # (g, O/g, I/g, kh', kw')
    exact, note = _operator_exactness(module, *kernel.shape[-2:])
    sv = conv_operator_singular_values(kernel, n)  # (g, n, n, r): union over groups (block-diagonal operator)
    sigma_map = sv[..., 0].amax(dim=0)  # (n, n)
    return {"n": n, "exact": exact, "note": note, "sigma_max": float(sigma_map.max()),
            "sigma_max_map": sigma_map.tolist()}


# ---- per-model report --------------------------------------------------------------------------------------
def _feature_size(feature_size: int | Mapping[str, int] | None, name: str) -> int | None:
    if isinstance(feature_size, Mapping):
        return feature_size.get(name)
    return feature_size


def layer_spectrum(module: nn.Module, weight: Tensor, *, n: int | None, quantiles: Sequence[float],
                   full: bool) -> dict:
    """JSON-ready report of one layer: matrix spectrum summary and, for convs with n given, the operator's."""
    sv = matrix_singular_values(weight.detach())  # descending
    qs = torch.quantile(sv, torch.tensor(quantiles, dtype=sv.dtype, device=sv.device))
    report = {
        "type": type(module).__name__,
        "shape": list(weight.shape),
        "sigma_max": float(sv[0]),
        # ||W||_F^2 / sigma_max^2: 1 for rank one, min(out, in k^2) for an orthogonal matrix.
        "stable_rank": float(sv.square().sum() / sv[0].square()),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(quantiles, qs)},
    }
    if full:
        report["singular_values"] = sv.tolist()
    if weight.ndim == 4 and n is not None:
        report["operator"] = conv_layer_operator(module, weight.detach(), n)
    return report


def weight_spectra(
    model: nn.Module,
    *,
    feature_size: int | Mapping[str, int] | None = None,
    quantiles: Sequence[float] = QUANTILES,
    full: bool = False,
) -> dict[str, dict]:
    """Layer name -> spectrum report for every Linear/Conv2d/ConvTranspose2d/Embedding/equalized layer.

    feature_size: the n of the n x n map for conv operator spectra, one for all convs or per layer name;
    None skips them. full=True adds all singular values of each reshaped weight. Reading does not change
    the model: it runs in eval mode (SN's u, v stay put) and the training flags are restored.
    """
    reports = {}
    with torch.no_grad(), eval_mode(model):  # torch's SN advances its power iteration in training mode
        for name, module in model.named_modules():
            weight = effective_weight(module)
            if weight is not None:
                n = _feature_size(feature_size, name)
                reports[name] = layer_spectrum(module, weight, n=n, quantiles=quantiles, full=full)
    return reports


# ---- image spectra -----------------------------------------------------------------------------------------
def frequency_radius(n: int) -> Tensor:
    """(n, n) integer radius round(sqrt(u^2 + v^2)) of each frequency in torch.fft order, u, v in cycles per image."""
    f = torch.fft.fftfreq(n, d=1.0 / n)  # 0, 1, ..., -1: signed integer frequencies
    return torch.sqrt(f[:, None].square() + f[None, :].square()).round().long()


def radial_average(power: Tensor) -> Tensor:
    """(..., n, n) power in torch.fft order -> (..., n // 2): mean over each ring r = 1, ..., n // 2 (index r - 1).

    DC (r = 0) is left out (images are mean-subtracted), and so are the corners beyond r = n // 2, which
    hold only diagonal orientations. Means, not sums, so a ring's value does not grow with its circumference.
    """
    n = power.shape[-1]
    radius = frequency_radius(n).to(power.device).flatten()  # (n^2,)
    keep = (radius >= 1) & (radius <= n // 2)
    index = radius[keep] - 1
    values = power.flatten(-2)[..., keep]  # (..., kept)
    sums = values.new_zeros(*values.shape[:-1], n // 2).index_add_(-1, index, values)
    return sums / torch.bincount(index, minlength=n // 2).to(values.dtype)


def _window(n: int, window: str | None, like: Tensor) -> Tensor | None:
    """Separable 2-D window scaled to unit mean square, so white noise keeps its level (Parseval)."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if window is None:
        return None
    w = torch.hann_window(n, periodic=True, dtype=like.dtype, device=like.device)
    w2 = torch.outer(w, w)  # (n, n)
    return w2 / w2.square().mean().sqrt()


def radial_power_spectrum(images: Tensor, *, window: str | None = None) -> Tensor:
    """Azimuthally averaged power spectrum: images (N, C, n, n) -> (n // 2,), index r - 1 for radius r.

    Each image has its mean subtracted; |FFT2|^2 uses the orthonormal DFT and is averaged over images and
    channels, then over rings (`radial_average`). Normalization: by Parseval the mean over all frequencies
    equals the per-pixel variance, so white noise of variance s^2 gives s^2 at every radius.
    window=None is the plain periodogram (as Durall et al. 2020): the DFT treats the image as periodic, and
    a discontinuity across its borders leaks power along the axes into high radii. window='hann' tapers the
    borders to zero to suppress that, at the cost of smearing each frequency over about +-1 bin: a missing
    DC then dips r = 1 by ~7% even for white noise.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (N, C, n, n), got {tuple(images.shape)}")
    x = _wide(images)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    w = _window(x.shape[-1], window, x)
    if w is not None:
        x = x * w
    power = torch.fft.fft2(x, norm="ortho").abs().square()  # (N, C, n, n)
    return radial_average(power.mean(dim=(0, 1)))


def spectral_discrepancy(fake: Tensor, real: Tensor, *, window: str | None = None) -> float:
    """Mean over radii of |log10 P_fake(r) - log10 P_real(r)|, in decades; 0 for identical spectra.

    P is `radial_power_spectrum` of each set, so 1 means the fake power is off by 10x on average over rings.
    Both sets must have the same size n x n. In the spirit of Durall et al. 2020 and Dzanic et al. 2020,
    which compare the (log) azimuthal spectra of real and generated images.
    """
    if fake.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"fake and real must have the same size, got {tuple(fake.shape)} and {tuple(real.shape)}")
    p_fake = radial_power_spectrum(fake, window=window).clamp_min(POWER_FLOOR)
    p_real = radial_power_spectrum(real, window=window).clamp_min(POWER_FLOOR)
    return float((p_fake.log10() - p_real.log10()).abs().mean())
