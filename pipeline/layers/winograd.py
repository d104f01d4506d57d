"""Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016) for stride-1, same-padded 3x3 convs, in plain PyTorch.

Why by hand: on CPU, PyTorch runs convolutions through oneDNN's direct algorithm, which does the full
9 multiply-adds per input channel and output pixel; oneDNN's own Winograd path cannot be chosen from
PyTorch. Winograd's minimal filtering computes a 4x4 output tile from a 6x6 input tile with 36
multiplications per (input, output) channel pair instead of 144: the channel-mixing work (one batched
GEMM per tile position) drops 4x, and the input/output transforms are small fixed matrices. For the
wide layers of StyleGAN2 (256-512 channels) the GEMM dominates and the conv gets ~1.5-2x faster; for
narrow layers the transforms' memory traffic eats the gain, so `conv3x3` only uses it where it pays.
On GPU, cuDNN already chooses Winograd itself, so `conv3x3` always calls `F.conv2d` there.

The backward is written out (`_WinogradConv3x3`): the input gradient is the same kind of conv, by
Winograd again, and the weight gradient reuses the forward's input tiles; plain autograd through the
forward would spend most of its time scattering the overlapping tiles back. It is built from
differentiable ops, so the double backward that R1 needs works too (gradgradcheck in the tests).
Results equal `F.conv2d` up to float32 rounding (relative error ~1e-5: the transforms have entries up
to 8 and 1/24).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

# F(4x4, 3x3) on the points 0, +-1, +-2, inf (Lavin & Gray 2016, sec. 4.2): Y = A^T [(G g G^T) * (B^T d B)] A.
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

TILE, ALPHA = 4, 6  # output tile m and input tile m + r - 1

# Where the direct conv stays: fewer channels than this on either side, or a map smaller than this.
# Measured with bench/winograd_conv.py on 2 CPU cores (batch 32): 512 channels win 1.5-2x at 8x8 to 32x32.
MIN_CHANNELS = 256
MIN_SIZE = 8


def _kron(a: list[list[float]], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 2-D transform X -> M X M^T of a tile, as one matrix acting on the flattened tile: kron(M, M)."""
    m = torch.tensor(a, dtype=torch.float64)
    return torch.kron(m, m).to(dtype=dtype, device=device)


def _tile_grid(h: int, w: int) -> tuple[int, int]:
    return -(-h // TILE), -(-w // TILE)  # tiles per column and row; the last ones may overhang


def _input_transform(x: Tensor) -> Tensor:
    """B^T d B of every 6x6 input tile: x (N, C, H, W) -> (36, C, tiles)."""
    n, c, h, w = x.shape
    th, tw = _tile_grid(h, w)
    kb = _kron(_BT, x.dtype, x.device)  # (36, 36)
    # Pad 1 (the same-padding) before, and after up to the overhanging last tile's extent.
    xp = F.pad(x, (1, TILE * tw + 1 - w, 1, TILE * th + 1 - h))
    # 6x6 input tiles at stride 4 (neighbours overlap by 2), channel-major: (C * tiles, 36).
    d = xp.unfold(2, ALPHA, TILE).unfold(3, ALPHA, TILE)  # (N, C, th, tw, 6, 6), a view
    d = d.transpose(0, 1).reshape(c * n * th * tw, ALPHA * ALPHA)
    return (kb @ d.t()).view(ALPHA * ALPHA, c, n * th * tw)  # one GEMM, already in the layout bmm wants


def _weight_transform(weight: Tensor) -> Tensor:
    """G g G^T of every 3x3 kernel: (K, C, 3, 3) -> (36, K, C)."""
    k, c = weight.shape[:2]
    return (_kron(_G, weight.dtype, weight.device) @ weight.reshape(k * c, 9).t()).view(ALPHA * ALPHA, k, c)


def _output_transform(m: Tensor, n: int, h: int, w: int) -> Tensor:
    """A^T m A of every tile: (36, K, tiles) -> (N, K, H, W)."""
    k = m.shape[1]
    th, tw = _tile_grid(h, w)
    y = m.view(ALPHA * ALPHA, -1).t() @ _kron(_AT, m.dtype, m.device).t()  # (K * tiles, 16)
    y = y.view(k, n, th, tw, TILE, TILE).permute(1, 0, 2, 4, 3, 5).reshape(n, k, th * TILE, tw * TILE)
    return y if (th * TILE, tw * TILE) == (h, w) else y[:, :, :h, :w]


def _output_transform_adjoint(dy: Tensor) -> Tensor:
    """The transpose of `_output_transform`: dy (N, K, H, W) -> (36, K, tiles)."""
    n, k, h, w = dy.shape
    th, tw = _tile_grid(h, w)
    dy = F.pad(dy, (0, TILE * tw - w, 0, TILE * th - h))  # the adjoint of the crop
    # (1, 0, 2, 4, 3, 5) is its own inverse: back to (K, N, th, tw, 4, 4)
    dy = dy.view(n, k, th, TILE, tw, TILE).permute(1, 0, 2, 4, 3, 5).reshape(-1, TILE * TILE)
    return (_kron(_AT, dy.dtype, dy.device).t() @ dy.t()).view(ALPHA * ALPHA, k, -1)


class _WinogradConv3x3(torch.autograd.Function):
    """Forward by Winograd; backward written out, so that no overlapping-tile scatter (unfold's backward,
    the slowest part under plain autograd) is needed:
      dx = the same conv of dy with the flipped, transposed kernel (itself by Winograd),
      dw = the adjoint of the weight transform of dU = dM V^T, with V the input tiles kept from the forward.
    Under create_graph (R1), V is recomputed from x with grad enabled, so the double backward is exact.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        v = _input_transform(x)  # (36, C, tiles)
        y = _output_transform(torch.bmm(_weight_transform(weight), v), x.shape[0], *x.shape[2:])
        ctx.save_for_backward(x, weight, v)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight, v = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _WinogradConv3x3.apply(dy, weight.flip((2, 3)).transpose(0, 1))
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: dw must stay a function of x
                v = _input_transform(x)
            du = torch.bmm(_output_transform_adjoint(dy), v.transpose(1, 2))  # (36, K, C)
            k, c = weight.shape[:2]
            kg = _kron(_G, du.dtype, du.device)  # (36, 9)
            dw = (kg.t() @ du.reshape(ALPHA * ALPHA, k * c)).t().reshape(k, c, 3, 3)
        return dx, dw


def winograd_conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """F.conv2d(x, weight, padding=1) by Winograd F(4x4, 3x3): x (N, C, H, W), weight (K, C, 3, 3) -> (N, K, H, W)."""
    if weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"weight must be (K, {x.shape[1]}, 3, 3) for input {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    return _WinogradConv3x3.apply(x, weight)


def use_winograd(x: Tensor, weight: Tensor, groups: int = 1) -> bool:
    """Whether `conv3x3` takes the Winograd path: CPU float32, 3x3, ungrouped, wide enough and large enough."""
    if os.environ.get("GAN_PIPELINE_CONV", "auto") == "direct":
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and groups == 1 and weight.shape[-2:] == (3, 3)
            and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS and min(x.shape[-2:]) >= MIN_SIZE)


def conv3x3(x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
    """Same-padded stride-1 3x3 conv: Winograd where it is faster (see `use_winograd`), else F.conv2d."""
    if use_winograd(x, weight, groups):
        return winograd_conv3x3(x, weight)
    return F.conv2d(x, weight, padding=1, groups=groups)
