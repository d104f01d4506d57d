"""Self-attention block of SAGAN (Zhang et al. 2019) in BigGAN's memory-saving form."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.spectral import SNLayers


class SelfAttention(nn.Module):
    """x + gamma * o(g . softmax(theta^T phi)); gamma starts at 0 so the block starts as the identity."""

    def __init__(self, channels: int, *, layers: SNLayers = SNLayers()) -> None:
        super().__init__()
        if channels < 8:
            raise ValueError(f"SelfAttention needs channels >= 8 (query/key width is channels // 8), got {channels}")
        self.channels = channels
        # SAGAN eq. 1-2 with BigGAN's reductions: C/8 for query/key, C/2 for value, no biases.
        self.theta = layers.conv(channels, channels // 8, 1, bias=False)  # query f(x)
        self.phi = layers.conv(channels, channels // 8, 1, bias=False)  # key g(x)
        self.g = layers.conv(channels, channels // 2, 1, bias=False)  # value h(x)
        self.o = layers.conv(channels // 2, channels, 1, bias=False)  # output v(.)
        # SAGAN eq. 3: y = gamma * o + x, gamma learned from 0 so attention is blended in gradually.
        # Shape (1,), not (): DeepSpeed's start-up broadcast views each bf16/fp16 weight as bytes, which fails
        # for 0-dim tensors.
        self.gamma = nn.Parameter(torch.zeros(1))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        gamma = state_dict.get(prefix + "gamma")
        if gamma is not None and gamma.dim() == 0:  # checkpoints from before gamma had shape (1,)
            state_dict[prefix + "gamma"] = gamma.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) with even H, W -> (N, C, H, W)."""
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (N, C/8, HW)
        # Keys and values are max-pooled 2x2: 4x fewer key positions, the same receptive field.
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # (N, C/8, HW/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # (N, C/2, HW/4)
        # beta[n, i, j]: how much output position i attends to pooled position j (SAGAN eq. 1).
        beta = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (N, HW, HW/4)
        attended = (g @ beta.transpose(1, 2)).view(n, c // 2, h, w)  # (N, C/2, H, W)
        return x + self.gamma * self.o(attended)
