"""`strategy=ddp|deepspeed`: which Lightning strategy runs the processes, and which engine steps each network.

The GAN module asks its backend for one engine per network (`engine`); train.py asks it for the
Lightning strategy (`lightning_strategy`) and lets it reject combinations that cannot work (`check`)
before anything heavy is built.
"""
from __future__ import annotations

import datetime
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.distributed.engine import NetEngine, TorchEngine
from pipeline.distributed.precision import Precision
from pipeline.distributed.strategy import GANDDPStrategy


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise ValueError(f"strategy.timeout_s={timeout_s} must be > 0 (seconds a collective may wait for a peer)")


def _strategy(process_group_backend: str | None, timeout_s: float) -> GANDDPStrategy:
    # The process group's timeout bounds every collective: gloo raises when it passes, NCCL's watchdog aborts.
    return GANDDPStrategy(process_group_backend=process_group_backend,
                          timeout=datetime.timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class DDPBackend:
    """Data parallel with hand-averaged gradients (`pipeline.distributed.sync`) and torch's GradScaler per network."""

    process_group_backend: str | None = None  # null = nccl on GPUs, gloo on CPU
    timeout_s: float = 600.0  # a collective that waits longer (a dead or hung peer) raises instead of hanging

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)

    def check(self, precision: Precision, device_type: str) -> None:
        if precision.mode == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision=bf16 needs a GPU with bf16 support (Ampere or newer): use precision=fp16")

    def lightning_strategy(self, world: int) -> Any:
        return _strategy(self.process_group_backend, self.timeout_s) if world > 1 else "auto"

    def engine(self, name: str, net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               device_type: str) -> NetEngine:
        return TorchEngine(name, net, optimizer, precision, device_type)


@dataclass(frozen=True)
class DeepSpeedBackend:
    """Two DeepSpeed engines (G and D) with ZeRO stage 1 or 2, fp16 through DeepSpeed's loss scaler, or bf16."""

    zero_stage: int = 1
    hysteresis: int = 2  # overflows tolerated before DeepSpeed lowers the fp16 scale (torch's GradScaler: 1)
    process_group_backend: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)
        if self.zero_stage not in (1, 2):
            raise ValueError(f"strategy.zero_stage={self.zero_stage}: use 1 (optimizer states partitioned) or 2 "
                             "(and gradients). Stage 3 partitions the weights themselves, which G_ema and the "
                             "direct G/D calls of the GAN step read whole on every rank")
        if self.hysteresis < 1:
            raise ValueError(f"strategy.hysteresis={self.hysteresis} must be >= 1")

    def check(self, precision: Precision, device_type: str) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("strategy=deepspeed needs the deepspeed package: pip install 'deepspeed>=0.19,<0.20'")
        if precision.mode == "fp16" and device_type != "cuda":
            raise ValueError("strategy=deepspeed with precision=fp16 needs CUDA (DeepSpeed has no fp16 on CPU): "
                             "use precision=bf16, or strategy=ddp precision=fp16 (torch's GradScaler works on CPU)")
        if precision.scope == "model":
            raise ValueError("precision.scope=model (fp16 only in some blocks) needs strategy=ddp: DeepSpeed casts "
                             "the whole network; use precision.scope=global")
        if precision.scaled and (precision.growth_factor != 2.0 or precision.backoff_factor != 0.5):
            raise ValueError("DeepSpeed's loss scaler always doubles and halves: leave precision.growth_factor=2 and "
                             "precision.backoff_factor=0.5 under strategy=deepspeed")
        DDPBackend().check(precision, device_type)

    def lightning_strategy(self, world: int) -> Any:
        return _strategy(self.process_group_backend, self.timeout_s)  # a process group even for one rank

    def config(self, precision: Precision) -> dict[str, Any]:
        """The DeepSpeed config of one engine (DeepSpeed's names: https://www.deepspeed.ai/docs/config-json/)."""
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # unused: the GAN module feeds the batches
            "gradient_accumulation_steps": 1,
            "steps_per_print": 2**31 - 1,
            "zero_optimization": {"stage": self.zero_stage},
            "gradient_clipping": precision.grad_clip or 0.0,
        }
        if precision.mode == "fp16":
            cfg["fp16"] = {"enabled": True, "loss_scale": 0,  # 0 = dynamic
                           "initial_scale_power": int(math.log2(precision.init_scale)),
                           "loss_scale_window": precision.growth_interval, "hysteresis": self.hysteresis,
                           "min_loss_scale": precision.min_scale}
        elif precision.mode == "bf16":
            cfg["bf16"] = {"enabled": True}
        return cfg

    def engine(self, name: str, net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               device_type: str) -> NetEngine:
        from pipeline.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(name, net, optimizer, precision, self.config(precision))
