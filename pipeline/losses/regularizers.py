"""Weight regularizers: pure functions from a module to a scalar penalty; no .backward(), no state."""

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

ORTHO_VARIANTS = ("offdiag", "full")

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
