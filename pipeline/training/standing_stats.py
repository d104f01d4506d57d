"""Standing statistics (Brock et al. 2019, appendix C): re-estimate G's BatchNorm statistics after training.

The running statistics are exponential averages over the last ~10 training batches of a G that kept
changing; standing statistics are the plain average over many forward passes of the final G (with the
sampling truncation), which often gives better samples. With per-class cBN statistics each class gets its
own average (grouped labels, so every class has enough samples in each batch). Only BatchNorm layers are
put in training mode: spectral norm's power iteration, dropout and the like stay as they are.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.layers.conditional_norm import ConditionalBatchNorm2d
from pipeline.training.sampling import FakeLabels, truncated_normal


def batchnorm_layers(G: nn.Module) -> list[nn.Module]:
    return [m for m in G.modules() if isinstance(m, (ConditionalBatchNorm2d, nn.modules.batchnorm._BatchNorm))]


def _reset_cumulative(bn: nn.Module) -> None:
    """Zero the statistics and switch to a cumulative average (momentum None) for the coming forwards."""
    if isinstance(bn, ConditionalBatchNorm2d):
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.batches_tracked = 0
        if bn.stats == "per_class":
            bn.class_running_mean.zero_()
            bn.class_running_var.fill_(1.0)
            bn.class_updates.zero_()
    else:
        bn.reset_running_stats()
    bn.momentum = None


def standing_copy(G: nn.Module, *, num_batches: int, batch_size: int, truncation: float | None = None,
                  seed: int = 0) -> nn.Module:
    """G itself when num_batches is 0 (or G has no BatchNorm), else a copy of G with standing statistics."""
    if num_batches == 0 or not batchnorm_layers(G):
        return G
    G = copy.deepcopy(G)
    standing_statistics(G, num_batches=num_batches, batch_size=batch_size, truncation=truncation, seed=seed)
    return G


@torch.no_grad()
def standing_statistics(G: nn.Module, *, num_batches: int, batch_size: int, truncation: float | None = None,
                        samples_per_class: int = 8, seed: int = 0, progress: bool = False) -> int:
    """Replace G's BatchNorm statistics by their average over `num_batches` forwards; returns the layers updated.

    Labels are grouped (`samples_per_class` of a class together) and uniform over classes; latents follow
    BigGAN's truncation (`truncation`: resample |z| above it). G is modified in place: pass a copy to keep
    the training statistics.
    """
    if num_batches < 1:
        raise ValueError(f"standing statistics need num_batches >= 1, got {num_batches}")
    layers = batchnorm_layers(G)
    if not layers:
        return 0
    device = next(G.parameters()).device
    momenta = [bn.momentum for bn in layers]
    was_training = G.training
    G.eval()
    for bn in layers:
        _reset_cumulative(bn)
        bn.training = True  # this module only: a cBN's gain and bias layers (spectral norm) stay in eval
    num_classes = getattr(G, "num_classes", 0)
    probs = torch.ones(num_classes) if num_classes > 0 else None
    labels = FakeLabels(grouping="grouped", samples_per_class=samples_per_class, distribution="uniform")
    gen = torch.Generator().manual_seed(seed)
    try:
        for i in tqdm(range(num_batches), desc="standing statistics", disable=not progress, leave=False):
            z = truncated_normal((batch_size, G.z_dim), truncation, generator=gen).to(device)
            y = labels.draw(batch_size, probs, rank=0, world=1, seed=seed, index=i, device=device)
            G(z, y)
    finally:
        for bn, m in zip(layers, momenta):
            bn.momentum = m
        G.train(was_training)
    return len(layers)
