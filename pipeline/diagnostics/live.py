"""Checks on a live generator: StyleGAN2's per-layer activation variance, and BigGAN's cBN class leakage.

activation_variance tests the premise of weight demodulation (StyleGAN2, Karras et al. 2020, sec. 2.2, eq. 3):
with w''_ijk = s_i w_ijk / sqrt(sum_ik (s_i w_ijk)^2), a conv of i.i.d. unit-variance inputs has unit-variance
outputs. cbn_leakage measures what per-class cBN statistics remove: the dependence of a sample's output on the
other classes' samples in its batch (pipeline/layers/conditional_norm.py).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pipeline.layers.conditional_norm import ConditionalBatchNorm2d
from pipeline.layers.modulated_conv import ModulatedConv2d


@contextlib.contextmanager
def _frozen(G: nn.Module, training: bool) -> Iterator[None]:
    """Run G in `training` mode and put back its mode, buffers (BN running stats, SN vectors, w_avg) and cBN
    batch counters afterwards, so a check leaves no trace on the model it inspects."""
    mode = G.training
    buffers = {k: v.clone() for k, v in G.named_buffers()}
    counters = {m: m.batches_tracked for m in G.modules() if isinstance(m, ConditionalBatchNorm2d)}
    G.train(training)
    try:
        yield
    finally:
        G.train(mode)
        with torch.no_grad():
            for k, v in G.named_buffers():
                v.copy_(buffers[k])
        for m, n in counters.items():
            m.batches_tracked = n


def _channel_variance(x: Tensor) -> float:
    """Mean over channels of the variance over (N, H, W): x (N, C, H, W)."""
    return float(x.float().transpose(0, 1).flatten(1).var(dim=1).mean())


def _demodulated_layers(G: nn.Module) -> list[tuple[str, ModulatedConv2d]]:
    """The synthesis convs whose output goes through a noise module (StyleGAN2's 3x3 demodulated convs)."""
    return [(name, m) for name, m in G.named_modules()
            if isinstance(m, ModulatedConv2d) and m.demodulate and m.noise is not None]


@torch.no_grad()
def activation_variance(G: nn.Module, *, num_samples: int = 64, generator: torch.Generator | None = None) -> dict:
    """Per demodulated synthesis conv of a StyleGAN2 G: variance of its input and of its raw conv output.

    The output is read where the noise module receives it (a forward pre-hook): after modulation, conv and
    demodulation, before noise, bias and activation. It is measured on the interior (one pixel cropped per side)
    since zero padding lowers the variance of border pixels. Variances: per channel over (N, H, W), averaged over
    channels. ratio = var_out / var_in is 1 in expectation for i.i.d. inputs of any variance; real activations
    are correlated across channels and pixels (and up=2 layers add FIR upsampling), so deviations measure how
    far G is from that premise. G runs in eval mode on random z (and labels), its state left as it was.
    """
    layers = _demodulated_layers(G)
    if not layers:
        raise ValueError("activation_variance needs a StyleGAN2 G (modulated convs with demodulation and noise)")
    device = next(G.parameters()).device
    seen: dict[str, dict] = {}
    hooks = []
    for name, conv in layers:
        def pre_conv(_m, args, name=name):  # ModulatedConv2d(x, w): x (N, C_in, H, W)
            seen.setdefault(name, {})["var_in"] = _channel_variance(args[0])

        def pre_noise(_m, args, name=name, up=conv.up):  # noise(x, mode): x (N, C_out, H', W'), the conv output
            seen[name].update(var_out=_channel_variance(args[0][:, :, 1:-1, 1:-1]), up=up,
                              resolution=args[0].shape[-1])
        hooks += [conv.register_forward_pre_hook(pre_conv), conv.noise.register_forward_pre_hook(pre_noise)]
    z = torch.randn(num_samples, G.z_dim, generator=generator, device=device)
    y = (torch.randint(0, G.num_classes, (num_samples,), generator=generator, device=device)
         if G.num_classes > 0 else None)
    try:
        with _frozen(G, training=False):
            G(z, y)
    finally:
        for h in hooks:
            h.remove()
    report = {name: {**v, "ratio": v["var_out"] / v["var_in"]} for name, v in seen.items()}
    return {
        "layers": report,
        "max_abs_log_var_out": max(abs(math.log(v["var_out"])) for v in report.values()),
        "max_abs_log_ratio": max(abs(math.log(v["ratio"])) for v in report.values()),
        "num_samples": num_samples,
    }


def _cbn_modes(G: nn.Module) -> list[str]:
    return sorted({m.stats for m in G.modules() if isinstance(m, ConditionalBatchNorm2d)})


@torch.no_grad()
def cbn_leakage(G: nn.Module, *, samples_per_class: int = 4, other_classes: int = 2,
                generator: torch.Generator | None = None) -> dict:
    """How much class-A outputs of a BigGAN G change when only the latents of the class-B samples change.

    Batch: samples_per_class samples of class 0 (A), then samples_per_class of each of classes 1..other_classes
    (B). G runs twice in training mode (batch statistics) from the same state, the second time with new z for
    the B samples. Reports the mean over A samples of ||G_A - G_A'|| / ||G_A||: 0 up to float rounding with
    per-class statistics, > 0 with pooled ones (the A samples are normalized with moments that include B).
    """
    modes = _cbn_modes(G)
    if not modes:
        raise ValueError("cbn_leakage needs a G with conditional BatchNorm (BigGAN)")
    if G.num_classes < other_classes + 1:
        raise ValueError(f"cbn_leakage needs {other_classes + 1} classes, G has {G.num_classes}")
    device = next(G.parameters()).device
    n = samples_per_class * (other_classes + 1)
    y = torch.arange(other_classes + 1, device=device).repeat_interleave(samples_per_class)  # (N,), A first
    z = torch.randn(n, G.z_dim, generator=generator, device=device)
    z2 = z.clone()
    z2[samples_per_class:] = torch.randn(n - samples_per_class, G.z_dim, generator=generator, device=device)
    outputs = []
    for latents in (z, z2):
        with _frozen(G, training=True):  # the same buffers (SN vectors, running stats) for both forwards
            outputs.append(G(latents, y)[:samples_per_class].flatten(1).double())
    a, b = outputs
    relative = (a - b).norm(dim=1) / a.norm(dim=1)  # (samples_per_class,)
    return {
        "cbn_stats": modes[0] if len(modes) == 1 else modes,
        "mean_relative_change": float(relative.mean()),
        "max_abs_change": float((a - b).abs().max()),
        "samples_per_class": samples_per_class,
        "other_classes": other_classes,
    }
