"""Started by torchrun from test_faults_distributed.py: gan-train with a record of each rank's batches.

argv: OUT_DIR TAG SIGTERM_RANK SIGTERM_AFTER_D_STEP OVERRIDES... (SIGTERM_RANK -1: no signal). Writes
OUT_DIR/TAG-rank{r}.pt with the batch hashes this rank trained on and its final weights, also when the
run stops on SIGTERM (exit 143).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

from pipeline.train import run
from tests.conftest import compose_train
from tests.distributed.ddp_worker import RecordBatches


class SigtermOneRank(L.Callback):
    """SIGTERM to this process alone, on one rank, after a given D step: the others never get the signal."""

    def __init__(self, rank: int, d_step: int) -> None:
        self.rank, self.d_step = rank, d_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_rank == self.rank and pl_module.d_step == self.d_step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    out, tag, sig_rank, sig_step = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rec = RecordBatches()
    rank = int(os.environ.get("RANK", "0"))
    gan = None
    try:
        _, gan = run(compose_train(sys.argv[5:]), callbacks=[rec, SigtermOneRank(sig_rank, sig_step)])
    finally:
        weights = {} if gan is None else {f"{n}.{k}": v for n in ("G", "D", "G_ema")
                                          for k, v in getattr(gan, n).state_dict().items()}
        torch.save({"batches": rec.hashes, "weights": weights}, out / f"{tag}-rank{rank}.pt")


if __name__ == "__main__":
    main()
