"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

D only ever sees T(x): the same random, differentiable transform T is applied to real and generated images, in
D's step and in G's step (the paper's fig. 4). Because T is differentiable, G's gradient flows back
through it, and R1 taken with respect to the un-augmented reals differentiates through it too (as StyleGAN2-ADA
does). Every op is a pure function of the images and its drawn parameters; `DiffAugment` draws the parameters.

Images are NCHW in [-1, 1]. The ops and ranges are the paper's (its official DiffAugment code):
    color        brightness + U(-0.5, 0.5); saturation: (x - channel mean) * U(0, 2) + channel mean;
                 contrast: (x - mean over C, H, W) * U(0.5, 1.5) + that mean (each drawn per sample)
    translation  an integer shift of up to `translation_ratio` of the size per axis, zero fill
    cutout       a zeroed `cutout_ratio`-sized square at a random centre, clipped at the borders

Randomness: the global CPU torch RNG unless a generator is given. The training module checkpoints that state
on every rank (gan_module._gather_rng_states), so a resumed run draws the same augmentations as an
uninterrupted one on any device (a few CPU numbers per call: no GPU RNG involved); each rank is seeded differently, so
under DDP each rank draws its own. The few numbers per call are moved to the images' device afterwards.
"""
from __future__ import annotations

import torch
from torch import Tensor

OPS = ("color", "translation", "cutout")

Params = dict[str, Tensor]  # one op's drawn parameters, each (N,) on the CPU (or the generator's device)


# ---- the ops: pure functions of images (N, C, H, W) and per-sample parameters (N,) ----------------------------
def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, 1) in x's dtype and on x's device, to broadcast over C, H, W."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def brightness(x: Tensor, shift: Tensor) -> Tensor:
    """x + shift: one constant per sample; the paper draws shift ~ U(-0.5, 0.5)."""
    return x + _per_sample(shift, x)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's distance from its channel mean (the grey image); U(0, 2) in the paper. 1 channel: no-op."""
    grey = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    return (x - grey) * _per_sample(factor, x) + grey


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale the distance from the sample's mean over C, H, W; U(0.5, 1.5) in the paper. Keeps that mean."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x - mean) * _per_sample(factor, x) + mean


def translate(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """out[n, :, i, j] = x[n, :, i - dy[n], j - dx[n]], zero where that falls outside: content moves by (dy, dx).

    Two gathers (differentiable: their backward is a scatter-add), all channels by the same shift."""
    N, C, H, W = x.shape
    rows = torch.arange(H, device=x.device) - dy.to(x.device).view(-1, 1)  # (N, H) source row of each output row
    cols = torch.arange(W, device=x.device) - dx.to(x.device).view(-1, 1)  # (N, W)
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (N, H, W)
    out = x.gather(2, rows.clamp(0, H - 1)[:, None, :, None].expand(N, C, H, W))
    out = out.gather(3, cols.clamp(0, W - 1)[:, None, None, :].expand(N, C, H, W))
    return torch.where(inside[:, None], out, 0.0)  # where, not a multiply: no NaN from 0 * inf


def cutout_mask(shape: torch.Size, cy: Tensor, cx: Tensor, size: tuple[int, int], device: torch.device) -> Tensor:
    """(N, 1, H, W) bool, True inside the size[0] x size[1] box whose centre is (cy, cx), clipped at the borders.

    The box covers rows cy - size // 2 ... cy - size // 2 + size - 1 (the paper's convention)."""
    N, _, H, W = shape
    top = (cy.to(device) - size[0] // 2).view(-1, 1)
    left = (cx.to(device) - size[1] // 2).view(-1, 1)
    r, c = torch.arange(H, device=device), torch.arange(W, device=device)
    in_rows = (r >= top) & (r < top + size[0])  # (N, H)
    in_cols = (c >= left) & (c < left + size[1])  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def cutout(x: Tensor, cy: Tensor, cx: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero the box of `cutout_mask` in every channel; the rest passes through unchanged."""
    return torch.where(cutout_mask(x.shape, cy, cx, size, x.device), 0.0, x)


# ---- sizes and draws ---------------------------------------------------------------------------------------
def _pixels(length: int, ratio: float) -> int:
    """ratio * length rounded half up (the paper's int(length * ratio + 0.5)): 1/8 of 32 -> 4, 1/2 of 32 -> 16."""
    return int(length * ratio + 0.5)


class DiffAugment:
    """T(x) for D's inputs: the policy's ops in order, with parameters drawn per sample at every call.

    `policy=[]` is the identity and draws nothing: `augment=none` costs nothing and leaves the RNG stream alone.
    """

    def __init__(self, *, policy: list[str] | tuple[str, ...] = (), translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5) -> None:
        self.policy = tuple(str(op) for op in policy)
        unknown = [op for op in self.policy if op not in OPS]
        if unknown:
            raise ValueError(f"augment.policy={list(self.policy)} has unknown op(s) {unknown}: valid ops are "
                             f"{', '.join(OPS)} (e.g. augment.policy=[{','.join(OPS)}])")
        for key, ratio in (("translation_ratio", translation_ratio), ("cutout_ratio", cutout_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"augment.{key}={ratio} must lie in [0, 1] (a fraction of the image size)")
        self.translation_ratio, self.cutout_ratio = float(translation_ratio), float(cutout_ratio)

    def __repr__(self) -> str:
        return (f"DiffAugment(policy={list(self.policy)}, translation_ratio={self.translation_ratio}, "
                f"cutout_ratio={self.cutout_ratio})")

    def sample(self, shape: torch.Size | tuple[int, ...], *,
               generator: torch.Generator | None = None) -> list[tuple[str, Params]]:
        """Each op's per-sample parameters for images of `shape` (N, C, H, W), drawn in policy order."""
        N, _, H, W = shape
        device = generator.device if generator is not None else torch.device("cpu")

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(N, generator=generator, device=device) * (high - low) + low

        def integers(low: int, high: int) -> Tensor:  # low ... high inclusive
            return torch.randint(low, high + 1, (N,), generator=generator, device=device)

        draws: list[tuple[str, Params]] = []
        for op in self.policy:
            if op == "color":
                draws.append((op, {"brightness": uniform(-0.5, 0.5), "saturation": uniform(0.0, 2.0),
                                   "contrast": uniform(0.5, 1.5)}))
            elif op == "translation":
                sy, sx = _pixels(H, self.translation_ratio), _pixels(W, self.translation_ratio)
                draws.append((op, {"dy": integers(-sy, sy), "dx": integers(-sx, sx)}))
            else:  # cutout. Centres 0 ... H - 1 for an odd box, 0 ... H for an even one: the box's possible
                # positions are then symmetric about the image (the paper's code).
                hy, hx = _pixels(H, self.cutout_ratio), _pixels(W, self.cutout_ratio)
                draws.append((op, {"cy": integers(0, H - hy % 2), "cx": integers(0, W - hx % 2)}))
        return draws

    def apply(self, x: Tensor, draws: list[tuple[str, Params]]) -> Tensor:
        """The ops with the given parameters (from `sample`); never in place on x."""
        _, _, H, W = x.shape
        for op, p in draws:
            if op == "color":
                x = contrast(saturation(brightness(x, p["brightness"]), p["saturation"]), p["contrast"])
            elif op == "translation":
                x = translate(x, p["dy"], p["dx"])
            else:
                x = cutout(x, p["cy"], p["cx"], (_pixels(H, self.cutout_ratio), _pixels(W, self.cutout_ratio)))
        return x

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """T(x) for images (N, C, H, W), with fresh parameters per sample."""
        if not self.policy:
            return x
        return self.apply(x, self.sample(x.shape, generator=generator))
