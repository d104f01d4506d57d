"""The run's verdict on bad data: counts from every rank, logged, and a stop above data.max_bad_fraction.

Each batch carries its stream's counts since the previous batch (pipeline/data/stream.py: good samples, images
that do not decode, bad labels, unreadable shards). After every batch the ranks add theirs up in one small
all-reduce, so all of them see the same totals and stop together at the same step: a rank that stopped alone
would leave the others waiting in the next collective. The totals are in the checkpoints, so a resumed run
goes on counting where it was.
"""
from __future__ import annotations

import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from pipeline.data.stream import PROBLEMS, DataError, Health, bad_data_message
from pipeline.distributed.sync import world_size

KEYS = ("ok", *PROBLEMS)


class DataHealth(L.Callback):
    """Adds up every rank's counts after each batch (a 4-number all-reduce, asynchronous on GPUs); reads them on
    the host, logs and judges every `trainer.log_every_n_steps` batches, so the step itself never waits for it."""

    def __init__(self, *, max_bad_fraction: float, source: str) -> None:
        self.max_bad_fraction, self.source = max_bad_fraction, source
        self._totals = torch.zeros(len(KEYS), dtype=torch.long)  # moves to the batches' device
        self._batches, self._warned = 0, False

    @property
    def totals(self) -> dict[str, int]:
        return dict(zip(KEYS, self._totals.tolist(), strict=True))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            return
        record = batch[2].detach().to(torch.long).clone()
        if world_size() > 1:
            dist.all_reduce(record)  # the same totals on every rank, so the same verdict at the same batch
        self._totals = self._totals.to(record.device) + record
        self._batches += 1
        if self._batches % max(1, trainer.log_every_n_steps) == 0:
            self._judge(trainer, pl_module)

    def _judge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self.totals
        bad = sum(totals[k] for k in PROBLEMS)
        read = bad + totals["ok"]
        pl_module.log_dict({f"data/{k}": float(v) for k, v in totals.items()}
                           | {"data/bad_fraction": bad / max(read, 1)}, on_step=True, prog_bar=False)
        if bad and not self._warned and trainer.is_global_zero:
            self._warned = True
            print(f"gan-train: data: bad samples are being skipped and counted (data/* in the logs); the run stops "
                  f"if they pass data.max_bad_fraction={self.max_bad_fraction}", file=sys.stderr)
        if read >= Health.JUDGE_AFTER and bad > self.max_bad_fraction * read:
            raise DataError(bad_data_message(totals, self.max_bad_fraction, self.source))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self.totals
        bad = sum(totals[k] for k in PROBLEMS)
        if bad and trainer.is_global_zero:
            counts = ", ".join(f"{totals[k]} {k.replace('_', ' ')}s" for k in PROBLEMS)
            print(f"gan-train: data: skipped {bad} of {bad + totals['ok']} samples read ({counts})", file=sys.stderr)

    def state_dict(self) -> dict[str, Any]:
        return self.totals

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._totals = torch.tensor([int(state_dict.get(k, 0)) for k in KEYS], dtype=torch.long)
