"""Regularizers: pure functions from a module or tensors to a scalar penalty; no .backward(), no state."""

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

ORTHO_VARIANTS = ("offdiag", "full")

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _wide(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (sums of many terms are taken at least in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _raw_weight(layer: nn.Module) -> Tensor:
    """The trainable weight: for a spectrally normalised layer, the original before division by sigma."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def orthogonal_penalty(module: nn.Module, *, variant: str = "offdiag") -> Tensor:
    """Sum over conv/linear weights of BigGAN's orthogonal regularization (Brock et al. 2019, eq. 3).

    'offdiag' is eq. 3, ||W W^T * (1 - I)||_F^2: only the rows' cosine-like overlaps are penalised,
    not their norms. 'full' is the original ||W W^T - I||_F^2 (Brock et al. 2017, eq. 2). W is each
    weight reshaped to (out, -1). Embeddings and 1-D parameters are skipped. Multiply by beta outside.
    """
    if variant not in ORTHO_VARIANTS:
        raise ValueError(f"unknown orthogonal_penalty variant {variant!r}; valid: {list(ORTHO_VARIANTS)}")
    penalty = None
    for layer in module.modules():
        if not isinstance(layer, _WEIGHT_LAYERS):
            continue
        w = _raw_weight(layer)
        w = w.reshape(w.shape[0], -1)  # (out, in * k * k)
        gram = w @ w.T  # (out, out)
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        residual = gram * (1.0 - eye) if variant == "offdiag" else gram - eye
        term = residual.pow(2).sum()
        penalty = term if penalty is None else penalty + term
    if penalty is None:
        return torch.zeros(())
    return penalty


def r1_penalty(real_logits: Tensor, real_images: Tensor, *, grad_scale: float = 1.0) -> Tensor:
    """R1 without gamma/2 (Mescheder et al. 2018, eq. 9): mean_i ||grad_x D(x_i)||^2 over real x_i.

    The caller multiplies by gamma / 2, and by the lazy interval k when it runs every k D steps
    (StyleGAN2 appendix B). `real_images` (N, C, H, W) must require grad and `real_logits` (N,) or
    (N, 1) must come from it; the graph is kept (create_graph) so the penalty can be backpropagated.
    Under fp16 loss scaling pass D's loss scale as `grad_scale`: the logits are multiplied by it before
    autograd.grad, so that the fp16 backward through D does not underflow, and the gradient divided by it
    again (PyTorch's AMP gradient-penalty recipe). An overflow makes the penalty inf, and the loss scaler
    then skips the step.
    """
    if not real_images.requires_grad:
        raise ValueError(
            "r1_penalty needs real_images.requires_grad: call real_images.detach().requires_grad_(True) "
            "before D's forward pass"
        )
    # Summing the logits gives each sample's own input gradient, since D(x_i) depends only on x_i.
    (grads,) = torch.autograd.grad(outputs=_wide(real_logits).sum() * grad_scale, inputs=real_images,
                                   create_graph=True)
    grads = _wide(grads) / grad_scale
    return grads.square().flatten(1).sum(1).mean()  # (N, C*H*W) -> (N,) -> scalar


def path_length_penalty(
    fake_images: Tensor,
    ws: Tensor,
    mean_path_length: Tensor,
    *,
    decay: float = 0.01,
    generator: torch.Generator | None = None,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """StyleGAN2 path length regularization (Karras et al. 2020, sec. 3.2, eq. 4).

    Returns (penalty, new running mean a', lengths); the caller stores a' and multiplies the
    penalty by the path-length weight (2 in StyleGAN2) and the lazy interval.

    E_{w,y}(||J_w^T y||_2 - a)^2 with y ~ N(0, I) / sqrt(H*W), so that the expected length does
    not grow with the resolution. `fake_images` (N, C, H, W) must be G's output for `ws`
    (N, num_ws, w_dim), which requires grad. As in the NVlabs implementations, a sample's length
    is sqrt(mean over the num_ws layers of sum over w_dim of (J^T y)^2), and the penalty is taken
    against the updated mean a' = a + decay * (mean(lengths) - a), through which gradient flows
    (with factor decay); the returned a' and lengths are detached. `grad_scale`: G's fp16 loss scale,
    applied before autograd.grad and removed after, as in `r1_penalty`.
    """
    if fake_images.ndim != 4 or ws.ndim != 3 or ws.shape[0] != fake_images.shape[0]:
        raise ValueError(
            f"path_length_penalty expects fake_images (N, C, H, W) and ws (N, num_ws, w_dim); "
            f"got {tuple(fake_images.shape)} and {tuple(ws.shape)}"
        )
    if not ws.requires_grad:
        raise ValueError("path_length_penalty needs ws.requires_grad, and fake_images computed from ws")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay} must lie in [0, 1]")
    height, width = fake_images.shape[2], fake_images.shape[3]
    noise = torch.randn_like(fake_images, generator=generator) / math.sqrt(height * width)  # y
    # grad of <G(w), y> w.r.t. w is J_w^T y, one (num_ws, w_dim) block per sample.
    (jty,) = torch.autograd.grad(outputs=(_wide(fake_images) * _wide(noise)).sum() * grad_scale, inputs=ws,
                                 create_graph=True)
    jty = _wide(jty) / grad_scale
    lengths = jty.square().sum(2).mean(1).sqrt()  # (N, num_ws, w_dim) -> (N,)
    a = mean_path_length.detach()
    new_mean = a + decay * (lengths.mean() - a)  # a' = a + decay (E[len] - a)
    penalty = (lengths - new_mean).square().mean()
    return penalty, new_mean.detach(), lengths.detach()
