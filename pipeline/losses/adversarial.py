"""Adversarial losses: pure functions from D logits to a scalar; no .backward(), no state."""

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def hinge_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge D loss (Lim & Ye 2017; BigGAN): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: Tensor) -> Tensor:
    """Hinge G loss: -E[D(G(z))]."""
    return -fake_logits.mean()


def logistic_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Logistic D loss (Goodfellow et al. 2014; StyleGAN2): E[softplus(-D(x))] + E[softplus(D(G(z)))]."""
    # softplus(-l) = -log sigmoid(l): binary cross-entropy with real = 1, fake = 0, computed stably.
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def logistic_g(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss (Goodfellow et al. 2014, sec. 3): E[softplus(-D(G(z)))]."""
    return F.softplus(-fake_logits).mean()


DLoss = Callable[[Tensor, Tensor], Tensor]
GLoss = Callable[[Tensor], Tensor]

LOSSES: dict[str, tuple[DLoss, GLoss]] = {
    "hinge": (hinge_d, hinge_g),
    "logistic": (logistic_d, logistic_g),
}


def get_loss(name: str) -> tuple[DLoss, GLoss]:
    """(d_loss, g_loss) pair for a loss name."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[name]
