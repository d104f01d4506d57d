"""Numeric precision of the forward passes (`precision=fp32|fp16|bf16`) and the fp16 loss-scaler settings.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero and values above 65504 become inf. Dynamic
loss scaling multiplies each network's loss by S before backpropagating, divides the gradients by S,
skips the step and halves S when a gradient is not finite, and doubles S after `growth_interval` clean
steps. A GAN needs one scaler per network: a D overflow must neither skip G's step nor lower G's scale.
bf16 has fp32's exponent range and needs no scaler.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

MODES = ("fp32", "fp16", "bf16")
SCOPES = ("global", "model")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """How G and D compute (`conf/precision/*.yaml`); the loss-scaler keys matter for fp16 only."""

    mode: str = "fp32"  # fp32 | fp16 | bf16
    # global: autocast around every forward of G and D. model: no autocast from outside; only the layers the
    # model puts in fp16 itself run in it (StyleGAN2's num_fp16_res highest-resolution blocks, as NVlabs does).
    scope: str = "global"
    init_scale: float = 2.0**16  # first loss scale S (a power of two; DeepSpeed takes its log2)
    growth_interval: int = 2000  # clean steps before S doubles (DeepSpeed: loss_scale_window)
    growth_factor: float = 2.0
    backoff_factor: float = 0.5  # S *= backoff on overflow (DeepSpeed always halves)
    min_scale: float = 1.0  # S below this ends the run: gradients overflow at every scale (DeepSpeed: min_loss_scale)
    grad_clip: float | None = None  # max L2 norm of each network's unscaled gradients; null = no clipping
    # Steps in a row whose gradients are not finite (skipped) before the run stops: a diverged run must not train
    # on NaN. Under fp16 the scaler's own halvings are such steps too.
    max_nonfinite_steps: int = 20

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"precision.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.scope not in SCOPES:
            raise ValueError(f"precision.scope={self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.scope == "model" and self.mode != "fp16":
            raise ValueError(f"precision.scope=model is for fp16 layers inside the model; with mode={self.mode} "
                             "use precision.scope=global")
        if not (self.init_scale > 0 and math.log2(self.init_scale).is_integer()):
            raise ValueError(f"precision.init_scale={self.init_scale} must be a power of two, e.g. 65536")
        if self.growth_interval < 1:
            raise ValueError(f"precision.growth_interval={self.growth_interval} must be >= 1")
        if not self.growth_factor > 1.0:
            raise ValueError(f"precision.growth_factor={self.growth_factor} must be > 1")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"precision.backoff_factor={self.backoff_factor} must lie in (0, 1)")
        if not 0.0 < self.min_scale <= self.init_scale:
            raise ValueError(f"precision.min_scale={self.min_scale} must lie in (0, init_scale={self.init_scale}]")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"precision.max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"precision.grad_clip={self.grad_clip} must be > 0, or null for no clipping")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.mode]

    @property
    def scaled(self) -> bool:
        """Whether gradients go through a dynamic loss scaler (fp16 only)."""
        return self.mode == "fp16"

    @contextlib.contextmanager
    def autocast(self, device_type: str) -> Iterator[None]:
        """The context for a forward pass of G or D: autocast to the low-precision dtype, or nothing."""
        if self.mode == "fp32" or self.scope == "model":
            yield
            return
        with torch.autocast(device_type=device_type, dtype=self.dtype):
            yield
