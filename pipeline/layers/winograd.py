"""Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016) for stride-1, same-padded 3x3 convs on CPU, with native tile transforms.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.layers import winograd_native

# F(4x4, 3x3) on the points 0, +-1, +-2, inf (Lavin & Gray 2016, sec. 4.2): Y = A^T [(G g G^T) * (B^T d B)] A.
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

TILE, ALPHA = 4, 6  # output tile m and input tile m + r - 1

@dataclass(frozen=True)
class WinogradRule:
    """Winograd pays for layers with at least `min_channels` on both sides and maps of at least `min_size`,
    and maps of at most `max_size_narrow` unless there are `wide` channels."""

    min_channels: int
    min_size: int
    max_size_narrow: int = 1 << 30
    wide: int = 0

    def pays(self, channels: int, size: int) -> bool:
        return (channels >= self.min_channels and size >= self.min_size
                and (size <= self.max_size_narrow or channels >= self.wide))


# Measured with bench/winograd_conv.py (batch 32, NHWC, 2 CPU cores) against oneDNN's direct conv, per
# vector ISA (torch.backends.cpu.get_cpu_capability()), because oneDNN's direct kernels differ a lot:
# - AVX512 (Sapphire Rapids), forward + backward: 512 channels win 1.5x at 8x8 to 32x32 and lose at 4x4
#   (0.9x); 256 channels win 1.4-1.9x at 8x8 and 16x16 but lose at 32x32 (0.92x), where the 2.25x larger
#   tile tensors no longer stay in cache; 128 channels and fewer lose (0.8x) or tie (1.1x at 16x16).
#   Measured before freed memory was kept (pipeline.training.host_memory), which favours Winograd's
#   larger temporaries, and with the PyTorch tile transforms (2.5-4x slower than the native ones); forward
#   only was not measured there. The same conservative rule serves both; re-measure it on such a machine.
# - AVX2 (AMD EPYC), freed memory kept, native transforms (winograd_native): forward + backward wins from
#   64 channels and 8x8 up (64: 1.7-1.8x at 32x32 and 16x16, 1.5x at 8x8; 128: 2.3x, 2.2x, 1.7x; 512 at
#   8x8: 2.0x), forward only 1.2-2.1x on the same layers; 32 channels lose forward (0.76x at 32x32) and
#   tie at 16x16, 4x4 maps tie at 64 and 512 channels (0.94-1.0x) and vary between runs at 128 (1.05-1.6x).
#   With the PyTorch transforms the rule was from 128 channels (1.65x / 1.48x / 1.36x at 128).
RULES: dict[str, dict[str, WinogradRule]] = {
    "AVX512": {"train": WinogradRule(256, 8, 16, 512), "inference": WinogradRule(256, 8, 16, 512)},
    "AVX2": {"train": WinogradRule(64, 8), "inference": WinogradRule(64, 8)},
}
DEFAULT_ISA = "AVX512"  # other ISAs: the most conservative table
CONV_MODES = ("auto", "direct", "winograd-torch")


def cpu_isa() -> str:
    """The vector ISA whose rule applies here (the `RULES` key)."""
    isa = torch.backends.cpu.get_cpu_capability()
    return isa if isa in RULES else DEFAULT_ISA


def _kron(a: list[list[float]], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 2-D transform X -> M X M^T of a tile, as one matrix acting on the flattened tile: kron(M, M)."""
    m = torch.tensor(a, dtype=torch.float64)
    return torch.kron(m, m).to(dtype=dtype, device=device)


def _tile_grid(h: int, w: int) -> tuple[int, int]:
    return -(-h // TILE), -(-w // TILE)  # tiles per column and row; the last ones may overhang


def _is_nhwc(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _native(*tensors: Tensor) -> bool:
    """Whether the fused C transforms may be used: they are not differentiable, so not where autograd records
    (R1's create_graph backward), and not under GAN_PIPELINE_CONV=winograd-torch."""
    return (not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and os.environ.get("GAN_PIPELINE_CONV", "auto") != "winograd-torch")


# Layout: every transformed tensor is (36, tiles, channels), channels innermost. Gathering the tiles from
# NHWC memory then copies whole channel vectors, and each transform is one plain row-major GEMM with the
# small 36x36 (or 16x36) matrix on the left. (A channel-major layout needs a transposed operand, which
# ran 15-20% slower on these CPUs.)
def _input_transform(x: Tensor) -> Tensor:
    """B^T d B of every 6x6 input tile: x (N, C, H, W), NCHW or NHWC memory -> (36, tiles, C)."""
    if _native(x) and (v := winograd_native.input_transform(x)) is not None:
        return v
    n, c, h, w = x.shape
    th, tw = _tile_grid(h, w)
    # Pad 1 (the same-padding) before, and after up to the overhanging last tile's extent: (N, Hp, Wp, C).
    xh = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, TILE * tw + 1 - w, 1, TILE * th + 1 - h))
    # 6x6 tiles at stride 4 (neighbours overlap by 2): (N, th, tw, C, 6, 6), a view; then one copy to
    # (36, tiles * C) with the tile's pixel index outermost.
    d = xh.unfold(1, ALPHA, TILE).unfold(2, ALPHA, TILE)
    d = d.permute(4, 5, 0, 1, 2, 3).reshape(ALPHA * ALPHA, n * th * tw * c)
    return (_kron(_BT, x.dtype, x.device) @ d).view(ALPHA * ALPHA, n * th * tw, c)


def _weight_transform(weight: Tensor) -> Tensor:
    """G g G^T of every 3x3 kernel: (K, C, 3, 3) -> (36, C, K)."""
    k, c = weight.shape[:2]
    u = _kron(_G, weight.dtype, weight.device) @ weight.reshape(k * c, 9).t()  # (36, K * C)
    return u.view(ALPHA * ALPHA, k, c).transpose(1, 2)


def _output_transform(m: Tensor, n: int, h: int, w: int, channels_last: bool = False) -> Tensor:
    """A^T m A of every tile: (36, tiles, K) -> (N, K, H, W), in NCHW or (channels_last) NHWC memory."""
    if _native(m) and (y := winograd_native.output_transform(m, n, h, w, channels_last)) is not None:
        return y
    k = m.shape[2]
    th, tw = _tile_grid(h, w)
    y = (_kron(_AT, m.dtype, m.device) @ m.reshape(ALPHA * ALPHA, -1)).view(TILE, TILE, n, th, tw, k)
    if channels_last:  # the one copy that assembles the tiles writes NHWC directly
        y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * TILE, tw * TILE, k).permute(0, 3, 1, 2)
    else:
        y = y.permute(2, 5, 3, 0, 4, 1).reshape(n, k, th * TILE, tw * TILE)
    return y if (th * TILE, tw * TILE) == (h, w) else y[:, :, :h, :w]


def _output_transform_adjoint(dy: Tensor) -> Tensor:
    """The transpose of `_output_transform`: dy (N, K, H, W) -> (36, tiles, K)."""
    if _native(dy) and (u := winograd_native.output_transform_adjoint(dy)) is not None:
        return u
    n, k, h, w = dy.shape
    th, tw = _tile_grid(h, w)
    dy = F.pad(dy.permute(0, 2, 3, 1), (0, 0, 0, TILE * tw - w, 0, TILE * th - h))  # the adjoint of the crop
    dy = dy.reshape(n, th, TILE, tw, TILE, k).permute(2, 4, 0, 1, 3, 5).reshape(TILE * TILE, -1)
    return (_kron(_AT, dy.dtype, dy.device).t() @ dy).view(ALPHA * ALPHA, n * th * tw, k)


class _WinogradConv3x3(torch.autograd.Function):
    """Forward by Winograd; backward written out, so that no overlapping-tile scatter (unfold's backward,
    the slowest part under plain autograd) is needed:
      dx = the same conv of dy with the flipped, transposed kernel (itself by Winograd),
      dw = the adjoint of the weight transform of dU = V^T dM, with V the input tiles kept from the forward.
    Under create_graph (R1), V is recomputed from x with grad enabled, so the double backward is exact.
    The output keeps the input's memory layout (NCHW or NHWC).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        v = _input_transform(x)  # (36, tiles, C)
        m = torch.bmm(v, _weight_transform(weight))  # channel mixing, one GEMM per tile position: (36, tiles, K)
        # The tiles are the largest tensor here (2.25x x): keep them only for a weight gradient (a frozen D
        # in the G step needs none).
        ctx.save_for_backward(x, weight, v if ctx.needs_input_grad[1] else None)
        return _output_transform(m, x.shape[0], *x.shape[2:], channels_last=_is_nhwc(x))

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight, v = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _WinogradConv3x3.apply(dy, weight.flip((2, 3)).transpose(0, 1))
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: dw must stay a function of x
                v = _input_transform(x)
            du = torch.bmm(v.transpose(1, 2), _output_transform_adjoint(dy))  # (36, C, K)
            k, c = weight.shape[:2]
            kg = _kron(_G, du.dtype, du.device)  # (36, 9)
            dw = (kg.t() @ du.transpose(1, 2).reshape(ALPHA * ALPHA, k * c)).t().reshape(k, c, 3, 3)
        return dx, dw


def winograd_conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """F.conv2d(x, weight, padding=1) by Winograd F(4x4, 3x3): x (N, C, H, W), weight (K, C, 3, 3) -> (N, K, H, W)."""
    if weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"weight must be (K, {x.shape[1]}, 3, 3) for input {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    return _WinogradConv3x3.apply(x, weight)


def use_winograd(x: Tensor, weight: Tensor, groups: int = 1) -> bool:
    """Whether `conv3x3` takes the Winograd path: CPU float32 outside autocast, 3x3, ungrouped, and this ISA's
    rule says it pays for this width and map size, with the backward (a gradient will flow) or forward only."""
    mode = os.environ.get("GAN_PIPELINE_CONV", "auto")
    if mode not in CONV_MODES:
        raise ValueError(f"GAN_PIPELINE_CONV={mode!r} is not one of {', '.join(CONV_MODES)}: 'auto' uses "
                         "Winograd where it pays on this CPU, 'direct' always calls F.conv2d, 'winograd-torch' is auto "
                         "with the PyTorch tile transforms instead of the native ones")
    if mode == "direct":
        return False
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and groups == 1 and weight.shape[-2:] == (3, 3)):
        return False
    if torch.is_autocast_enabled("cpu"):  # fp16/bf16 asked for: F.conv2d casts, the fp32 transforms would not
        return False
    backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    rule = RULES[cpu_isa()]["train" if backward else "inference"]
    return rule.pays(min(weight.shape[0], weight.shape[1]), min(x.shape[-2:]))


def conv3x3(x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
    """Same-padded stride-1 3x3 conv: Winograd where it is faster (see `use_winograd`), else F.conv2d."""
    if use_winograd(x, weight, groups):
        return winograd_conv3x3(x, weight)
    return F.conv2d(x, weight, padding=1, groups=groups)
