"""Started by torchrun from test_ddp.py: a short training run that records what each rank saw and ended with."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import lightning as L
import torch

from pipeline.train import run
from tests.conftest import compose_train


class RecordBatches(L.Callback):
    """Hashes of the real batches this rank trained on."""

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.resolutions: list[int] = []  # the resolution each step trained at (progressive growing)
        self.g_lrs: list[float] = []  # G's lr at each step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y, _ = batch  # the third is the data health record
        self.hashes.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.resolutions.append(pl_module.D.active_resolution)
        self.g_lrs.append(float(pl_module.engines["G"].optimizer.param_groups[0]["lr"]))


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose_train(sys.argv[2:])
    rec = RecordBatches()
    _, gan = run(cfg, callbacks=[rec])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"G": gan.G.state_dict(), "D": gan.D.state_dict(), "G_ema": gan.G_ema.state_dict(),
                "batches": rec.hashes, "images_seen": gan.images_seen, "resolutions": rec.resolutions,
                "g_lrs": rec.g_lrs}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
