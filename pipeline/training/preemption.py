"""SIGTERM (a Kubernetes eviction, torchrun stopping its workers): finish the step, checkpoint, exit.

Lightning has SIGTERM handling of its own, but it decides per rank (a rank that got the signal stops
alone and the others hang in their next collective) and runs a broadcast inside the signal handler.
Pods of a multi-node job are evicted one node at a time, so here the handler only records the signal;
after every training batch all ranks agree (one all-reduce of a flag) and, if any rank got it, every
rank takes part in writing `last.ckpt` and the process exits with 143 (128 + SIGTERM). A non-zero code
matters: torchrun restarts failed workers (`--max-restarts`) and a Kubernetes Job replaces failed pods,
and `resume=auto` then continues from that checkpoint; an exit code of 0 would mark the run complete.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from pipeline.distributed.sync import world_size

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class Preemption(L.Callback):
    """On SIGTERM, every rank stops after the current batch; `last.ckpt` is written within `grace_s`, or a warning."""

    def __init__(self, *, ckpt_path: Path, grace_s: float) -> None:
        self.ckpt_path, self.grace_s = Path(ckpt_path), grace_s
        self.received_at: float | None = None
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Replaces Lightning's handler for the run.
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()  # Preempted included: run() may be called again in this process

    def _restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _any_rank_signalled(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received_at is not None else 0.0], device=device)
        if world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._any_rank_signalled(pl_module.device):
            return
        started = self.received_at or time.monotonic()  # ranks that did not get the signal themselves
        trainer.save_checkpoint(self.ckpt_path)  # collective: every rank is here after the same batch
        elapsed = time.monotonic() - started
        if trainer.is_global_zero:
            kimg = getattr(pl_module, "images_seen", 0) / 1000
            print(f"gan-train: SIGTERM: wrote {self.ckpt_path} at {kimg:.3f} kimg, {elapsed:.1f} s after the signal "
                  f"(grace {self.grace_s:g} s); exiting with {PREEMPTED_EXIT_CODE}, resume=auto continues",
                  file=sys.stderr)
            if elapsed > self.grace_s:
                print(f"gan-train: warning: the checkpoint took longer than train.preempt_grace_s={self.grace_s:g}: "
                      "raise it (and the pods' terminationGracePeriodSeconds) or the next one may be killed first",
                      file=sys.stderr)
        raise Preempted()
