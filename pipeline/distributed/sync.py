"""Gradient and buffer synchronisation across data-parallel ranks.

We all-reduce gradients by hand instead of wrapping G and D in DistributedDataParallel because a GAN
step breaks DDP's assumptions: D runs forward twice per G step, G's parameters are unused in the D
step, and gradient penalties (R1, path length) need double backward, which DDP's reducer does not
support. StyleGAN2-ADA synchronises the same way. With identical initial weights, identical averaged
gradients and identical optimizers, every rank keeps identical parameters.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `params` over all ranks (one flat all-reduce)."""
    n = world_size()
    if n == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    # A parameter unused on this rank takes part with zeros, so the buffers line up across ranks. One unused
    # on *every* rank (a layer progressive growing has not reached yet) keeps grad None, as in one process:
    # torch's Adam then leaves its state alone instead of counting steps whose bias correction would
    # inflate the layer's first real updates. The used-flags ride along in the same all-reduce.
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [used.to(params[0].grad.dtype)])
    dist.all_reduce(flat)
    used_anywhere = flat[-len(params):] > 0
    flat /= n
    offset = 0
    for p, keep in zip(params, used_anywhere.tolist()):
        numel = p.numel()
        if keep:
            p.grad.copy_(flat[offset : offset + numel].view_as(p.grad))
        else:
            p.grad = None
        offset += numel


def sync_buffers(module: nn.Module) -> None:
    """Average running statistics (BatchNorm, StyleGAN2's w_avg) across ranks.

    They are exponential moving averages, which are linear, so averaging them every step gives the
    running average of the per-rank statistics. Other buffers (spectral-norm vectors, constant noise)
    depend only on the weights or on the start-up broadcast, so they are already equal on every rank.
    """
    n = world_size()
    if n == 1:
        return
    for name, buf in module.named_buffers():
        if name.endswith(("running_mean", "running_var", "w_avg")) and buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= n


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place average of a tensor over ranks (running statistics such as the path-length mean)."""
    n = world_size()
    if n > 1:
        dist.all_reduce(tensor)
        tensor /= n
    return tensor


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (start of training)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
