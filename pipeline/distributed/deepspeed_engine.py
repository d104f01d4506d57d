"""One DeepSpeed engine per network (G and D): ZeRO-1/2, DeepSpeed's own fp16 loss scaler per engine, or bf16.

Lightning's DeepSpeedStrategy wraps one model with one optimizer; a GAN has two networks that step at
different times, so each gets its own `deepspeed.initialize` here, on the process group that
`GANDDPStrategy` set up. The GAN module calls G and D directly (never `engine.forward`): under ZeRO
stages 1 and 2 every rank holds the full low-precision weights, and DeepSpeed's gradient hooks sit on
the parameters, so a direct call is what the engine's forward would do. DeepSpeed casts the network to
fp16/bf16; a forward pre-hook casts floating inputs to that dtype.

Checkpoints: each rank's ZeRO partition of the fp32 master weights and Adam moments is gathered into
the one Lightning checkpoint (as the RNG states are), stripped of pickled DeepSpeed objects so that it
loads with `weights_only=True`, and every rank takes back its own partition on resume.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.distributed.engine import LossScaleError, check_nonfinite_run
from pipeline.distributed.precision import Precision
from pipeline.distributed.sync import world_size

_DROPPED = ("param_slice_mappings", "universal_checkpoint_info")  # layout maps for DeepSpeed's universal checkpoints


def _cast_inputs(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cast = lambda v: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


def _portable(state: dict[str, Any]) -> dict[str, Any]:
    """A ZeRO optimizer state dict with only tensors and plain values (loads under weights_only=True)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue
        if key == "loss_scaler":  # a DeepSpeed LossScaler object: keep its numbers
            value = {k: v for k, v in vars(value).items() if isinstance(v, (bool, int, float))}
        elif key == "zero_stage":  # a ZeroStageEnum
            value = int(value)
        out[key] = value
    return out


class DeepSpeedEngine:
    """`NetEngine` on a DeepSpeed engine: DeepSpeed reduces gradients, scales fp16 losses and clips."""

    def __init__(self, name: str, net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 config: dict[str, Any]) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # one INFO block per engine otherwise
        self.name, self.net, self.precision = name, net, precision
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config,
                                                                 dist_init_required=False)
        self.dtype = next(net.parameters()).dtype  # fp16 / bf16 after initialize, fp32 without either
        if self.dtype != torch.float32:
            # DeepSpeed casts the parameters only; buffers that meet them in one op (spectral norm's u and v,
            # BatchNorm statistics) must follow, or those ops see mixed dtypes.
            for module in net.modules():
                for key, buf in module._buffers.items():
                    if buf is not None and buf.is_floating_point():
                        module._buffers[key] = buf.to(self.dtype)
            net.register_forward_pre_hook(_cast_inputs(self.dtype), with_kwargs=True)
        self.nonfinite_steps = 0  # bf16/fp32 steps skipped for a non-finite loss (fp16: DeepSpeed's skipped_steps)
        self.consecutive_skips = 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the network itself is in fp16 / bf16

    @property
    def grad_scale(self) -> float:
        return float(self.optimizer.loss_scale) if self.precision.scaled else 1.0

    def _finite_on_every_rank(self, loss: Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).all().float().reshape(1)
        if world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def step(self, loss: Tensor) -> bool:
        if not self.precision.scaled and not self._finite_on_every_rank(loss):
            # Without a loss scaler nothing would catch it: skip the step on every rank (ZeRO-2 reduces in backward).
            self.nonfinite_steps += 1
            self.consecutive_skips += 1
            check_nonfinite_run(self.name, self.consecutive_skips, self.precision)
            return False
        self.engine.backward(loss)
        try:
            self.engine.step()
        except Exception as e:  # DeepSpeed's DynamicLossScaler raises a bare Exception at min_loss_scale
            if "loss scale already at minimum" not in str(e):
                raise
            raise LossScaleError(
                f"{self.name}'s DeepSpeed fp16 loss scale is at precision.min_scale={self.precision.min_scale:g} and "
                "its gradients still overflow. Lower the learning rate, set precision.grad_clip, use "
                "precision=bf16, or resume from an earlier checkpoint") from e
        applied = bool(self.engine.was_step_applied())
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        check_nonfinite_run(self.name, self.consecutive_skips, self.precision)
        return applied

    def stats(self) -> dict[str, float]:
        if not self.precision.scaled:
            return {"skipped_steps": float(self.nonfinite_steps)} if self.nonfinite_steps else {}
        return {"loss_scale": self.grad_scale, "skipped_steps": float(self.engine.skipped_steps)}

    def state_dict(self) -> dict[str, Any]:
        """Every rank's partition (a collective: all ranks must call it, as Lightning's checkpoint dump does)."""
        local = _portable(self.optimizer.state_dict())
        partitions: list[Any] = [local]
        if world_size() > 1:
            partitions = [None] * world_size()
            dist.all_gather_object(partitions, local)
        return {"zero": partitions, "skipped_steps": self.engine.skipped_steps,
                "global_steps": self.engine.global_steps, "nonfinite_steps": self.nonfinite_steps,
                "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "zero" not in state:
            raise ValueError(f"the checkpoint's {self.name} optimizer was not saved under strategy=deepspeed; "
                             "resume it with the strategy it was trained with")
        partitions = [dict(p) for p in state["zero"]]
        if len(partitions) != world_size():
            raise ValueError(f"the checkpoint holds {len(partitions)} ZeRO partitions of {self.name}'s optimizer "
                             f"but {world_size()} processes run: resume with {len(partitions)} processes")
        scaler = partitions[dist.get_rank() if world_size() > 1 else 0].get("loss_scaler", {})
        for p in partitions:
            p.pop("loss_scaler", None)  # DeepSpeed would put the dict in place of its scaler object
        self.optimizer.load_state_dict(state_dict_list=partitions, load_optimizer_states=True,
                                       load_from_fp32_weights=True)
        for key, value in scaler.items():
            setattr(self.optimizer.loss_scaler, key, value)
        self.engine.skipped_steps = int(state.get("skipped_steps", 0))
        self.engine.global_steps = int(state.get("global_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
