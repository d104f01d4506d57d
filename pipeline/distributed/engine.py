"""One network's optimizer step under a strategy and a precision: the small interface the GAN module calls.

The LightningModule owns G and D and computes the losses; an engine owns everything between a loss and
updated weights: autocast, the loss scaler, backward, the gradient all-reduce, clipping and the
optimizer. `TorchEngine` does this with a torch optimizer, `torch.amp.GradScaler` and
`pipeline.distributed.sync`; `DeepSpeedEngine` (deepspeed_engine.py) with a DeepSpeed engine. Each
network has its own engine, so its own loss scale and its own skipped steps.
"""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pipeline.distributed.precision import Precision
from pipeline.distributed.sync import all_reduce_grads


class LossScaleError(FloatingPointError):
    """The loss scale fell below its floor: this network's gradients are not finite at any scale."""


class NonFiniteError(FloatingPointError):
    """A network's gradients were not finite for precision.max_nonfinite_steps steps in a row."""


def check_nonfinite_run(name: str, consecutive: int, precision: Precision) -> None:
    """Stop a run whose steps keep being skipped (the weights are still finite: the bad steps were not taken)."""
    if consecutive >= precision.max_nonfinite_steps:
        raise NonFiniteError(
            f"{name}'s gradients were not finite for {consecutive} steps in a row (precision.max_nonfinite_steps="
            f"{precision.max_nonfinite_steps}); those steps were skipped, so the weights and the last checkpoint are "
            "intact. The run has diverged: resume from the last checkpoint with a lower learning rate, a stronger "
            "R1 (model.objective.r1_gamma) or precision.grad_clip")


def grads_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient is finite: one fused norm pass and one host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


class NetEngine(Protocol):
    """What `pipeline.gan_module.GAN` needs from one network's training machinery."""

    name: str
    optimizer: torch.optim.Optimizer  # the torch optimizer underneath (its param_groups hold the lr)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for this network's forward passes."""

    @property
    def grad_scale(self) -> float:
        """The current loss scale (1 without a scaler); a gradient penalty scales its outputs by it."""

    def step(self, loss: Tensor) -> bool:
        """Backward `loss`, average gradients over ranks, update; False when the step was skipped (overflow)."""

    def stats(self) -> dict[str, float]:
        """Numbers to log: loss scale and skipped steps when a scaler is used, else nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly: optimizer, scaler, counters (a collective under DeepSpeed)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchEngine:
    """torch optimizer + optional per-network GradScaler + hand-written gradient all-reduce (DDP, or one process).

    Order within a step: scaled backward -> all-reduce the scaled gradients (an inf on any rank becomes inf
    on every rank, so all ranks skip together and their scales stay equal) -> unscale -> clip the unscaled
    gradients -> step unless not finite -> update the scale.
    """

    def __init__(self, name: str, net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 device_type: str) -> None:
        self.name, self.net, self.optimizer, self.precision = name, net, optimizer, precision
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, init_scale=precision.init_scale,
                                           growth_factor=precision.growth_factor,
                                           backoff_factor=precision.backoff_factor,
                                           growth_interval=precision.growth_interval, enabled=precision.scaled)
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return self.precision.autocast(self.device_type)

    @property
    def grad_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.precision.scaled else 1.0

    def step(self, loss: Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        params = [p for p in self.net.parameters() if p.requires_grad]
        all_reduce_grads(params)
        self.scaler.unscale_(self.optimizer)  # a no-op without a scaler
        norm = None  # the total gradient norm, when clipping has computed it already
        if self.precision.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.precision.grad_clip)
        if not self.precision.scaled:
            # The gradients were all-reduced, so a NaN on any rank is a NaN here: every rank decides alike.
            applied = grads_finite(params) if norm is None else bool(torch.isfinite(norm))
            if applied:
                self.optimizer.step()
        else:
            before = self.grad_scale
            self.scaler.step(self.optimizer)  # skips the step if unscale_ found a non-finite gradient
            self.scaler.update()
            applied = self.grad_scale >= before  # update() lowers the scale exactly when it skipped
        self.skipped_steps += not applied
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        if self.grad_scale < self.precision.min_scale:
            raise LossScaleError(
                f"{self.name}'s fp16 loss scale fell to {self.grad_scale:g}, below precision.min_scale="
                f"{self.precision.min_scale:g}, after {self.skipped_steps} skipped steps: its gradients overflow at "
                "every scale. Lower the learning rate, set precision.grad_clip, use precision=bf16, or resume from "
                "an earlier checkpoint")
        check_nonfinite_run(self.name, self.consecutive_skips, self.precision)
        return applied

    def stats(self) -> dict[str, float]:
        if not self.precision.scaled:
            return {"skipped_steps": float(self.skipped_steps)} if self.skipped_steps else {}
        return {"loss_scale": self.grad_scale, "skipped_steps": float(self.skipped_steps)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaled and state.get("scaler"):  # empty: saved without a scaler (another precision)
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
