"""What to watch while a GAN trains, besides its losses: SN singular values, gradient norms, memory.

BigGAN's collapse is preceded by the top singular values of G's and D's weights exploding (Brock et
al. 2019, sec. 4.1): `spectral_sigmas` reads the estimate that spectral norm already keeps (u^T W v
with its persistent power-iteration vectors), so watching it costs one matrix-vector product per layer.
"""
from __future__ import annotations

import resource
import sys
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.utils import parametrize


def spectral_sigmas(net: nn.Module) -> dict[str, float]:
    """{module path: sigma} for every spectrally normalised weight: u^T W v, W the raw weight as a matrix."""
    sigmas = {}
    for name, module in net.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        for p in module.parametrizations.weight:
            if hasattr(p, "_u") and hasattr(p, "_reshape_weight_to_matrix"):  # torch's _SpectralNorm
                w = p._reshape_weight_to_matrix(module.parametrizations.weight.original.detach())
                sigmas[name or "."] = float(torch.dot(p._u, torch.mv(w, p._v)))
    return sigmas


def grad_norm(net: nn.Module) -> float:
    """L2 norm of all gradients of `net` together (0 when it has none yet)."""
    grads = [p.grad.detach() for p in net.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory when training on a GPU."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"memory/peak_rss_mb": peak / (1024 * 1024 if sys.platform == "darwin" else 1024)}
    if device.type == "cuda":
        out["memory/cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class NetworkStats(L.Callback):
    """Every `every_kimg`: SN sigmas of G and D (each layer and the largest), gradient norms, memory."""

    def __init__(self, *, every_kimg: float) -> None:
        if every_kimg <= 0:
            raise ValueError(f"every_kimg must be > 0, got {every_kimg}")
        self.every_kimg = every_kimg
        self._next_kimg = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._next_kimg = pl_module.images_seen / 1000.0 + self.every_kimg

    def collect(self, pl_module: L.LightningModule) -> dict[str, float]:
        stats: dict[str, float] = {}
        for net_name in ("G", "D"):
            net = getattr(pl_module, net_name)
            # The D step left D's gradients and the last G step G's (zeroed only at the next step).
            stats[f"grad_norm/{net_name}"] = grad_norm(net)
            sigmas = spectral_sigmas(net)
            if sigmas:
                stats[f"sn_sigma/{net_name}_max"] = max(sigmas.values())
                stats.update({f"sn_sigma/{net_name}/{k}": v for k, v in sigmas.items()})
        stats.update(memory_mb(pl_module.device))
        return stats

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        kimg = pl_module.images_seen / 1000.0
        if kimg < self._next_kimg:
            return
        self._next_kimg = kimg + self.every_kimg
        # rank_zero_only: each rank's values differ only by float noise (gradients are averaged), and
        # only rank 0 writes to the loggers.
        pl_module.log_dict(self.collect(pl_module), on_step=True, rank_zero_only=True)
