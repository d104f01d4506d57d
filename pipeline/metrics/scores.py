"""The metrics, on features: FID and KID (torchmetrics), improved precision/recall, intra-FID, accuracy.

Features are extracted (and the real ones cached) before they reach torchmetrics, so its metrics are
given an identity "feature extractor". Each function takes real and fake features (N, d) and
returns plain floats; none keeps state.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from pipeline.metrics.errors import EvalError


class _Precomputed(nn.Module):
    """Identity: the 'images' torchmetrics sees are already features (N, d)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


# sync_on_compute=False: under DDP only rank 0 computes, on features it has already gathered;
# torchmetrics' own all-gather would wait forever for the other ranks.
def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017, eq. 6)."""
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float, int]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel,
    averaged over random subsets. Returns (mean, std over subsets, the subset size used)."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise EvalError(f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    # Exact differences, not the |a|^2 + |b|^2 - 2ab shortcut: a point's distance to itself must be 0.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x: Tensor, k: int, batch: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in `x`, itself excluded (N,)."""
    if len(x) <= k:
        raise EvalError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(x)}")
    return torch.cat([_pairwise(x[i:i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)])


def _coverage(query: Tensor, ref: Tensor, radii: Tensor, batch: int = 1024) -> float:
    """Fraction of `query` inside the union of balls around `ref` with the given radii."""
    inside = [(_pairwise(query[i:i + batch], ref) <= radii[None]).any(dim=1) for i in range(0, len(query), batch)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-3): the fraction of fakes inside the
    real manifold (k-NN balls around real features), and of reals inside the fake manifold."""
    real, fake = real.double(), fake.double()
    return _coverage(fake, real, knn_radii(real, k)), _coverage(real, fake, knn_radii(fake, k))


def intra_fid(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, num_classes: int
              ) -> tuple[float, list[float]]:
    """FID within each class (Miyato & Koyama 2018) and their mean: (mean, [FID of class 0, 1, ...])."""
    per_class = []
    for c in range(num_classes):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if len(r) < 2 or len(f) < 2:
            raise EvalError(f"intra_fid needs at least 2 real and 2 generated samples of class {c}, got {len(r)} "
                            f"and {len(f)}; raise --num-samples")
        per_class.append(fid(r, f))
    return sum(per_class) / len(per_class), per_class


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose arg-max class is the label they were generated for."""
    return float((logits.argmax(dim=1) == labels).float().mean())
