"""The shared case of the per-class cBN test across ranks: a batch whose classes are split over both halves."""
import torch

from pipeline.layers.conditional_norm import ConditionalBatchNorm2d


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, 2, 2, 1, 1, 3, 3])  # rank 0: 0 0 1 2 2 | rank 1: 2 1 1 3 3
    x = torch.randn(10, 3, 4, 4, generator=g) * 2 + y[:, None, None, None].float()
    return x, y


def layer() -> ConditionalBatchNorm2d:
    torch.manual_seed(0)
    bn = ConditionalBatchNorm2d(3, 0, stats="per_class", num_classes=4, min_count=2).train()
    with torch.no_grad():  # a non-trivial affine so its gradients are not all equal
        bn.gain.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def loss_weights() -> torch.Tensor:
    return torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
