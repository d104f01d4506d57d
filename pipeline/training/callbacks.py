"""Lightning callbacks: sample grids from G_ema, throughput, and the run summary."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from pipeline.training.sampling import make_grid, truncated_normal
from pipeline.training.standing_stats import standing_copy


def _kimg(pl_module: L.LightningModule) -> float:
    return pl_module.images_seen / 1000.0


class SampleGrid(L.Callback):
    """Writes `samples/kimg-XXXXX.X.png` from G_ema at fixed latents: one row per class.

    The latents come from their own seeded generator, so grids are comparable across a run and a resume.
    """

    def __init__(self, *, out_dir: str | Path, every_kimg: float, samples_per_class: int, truncation: float,
                 seed: int, standing_stats: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.standing_stats = standing_stats  # > 0: grids from a copy of G_ema with standing statistics
        self.every_kimg, self.per_class = every_kimg, samples_per_class
        self.truncation, self.seed = truncation, seed
        self._next_kimg = 0.0
        self.last_path: Path | None = None

    def _fixed_inputs(self, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        G = pl_module.G_ema
        rows = max(1, G.num_classes)
        gen = torch.Generator().manual_seed(self.seed)
        z = truncated_normal((rows * self.per_class, G.z_dim), self.truncation, generator=gen)
        y = torch.arange(rows).repeat_interleave(self.per_class)
        return z.to(pl_module.device), y.to(pl_module.device)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        z, y = self._fixed_inputs(pl_module)
        # A copy when standing statistics are asked for: G_ema's own statistics keep following G.
        G = standing_copy(pl_module.G_ema, num_batches=self.standing_stats, batch_size=len(y),
                          truncation=self.truncation, seed=self.seed)
        grid = make_grid(G(z, y), nrow=self.per_class)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{tag}.png"
        Image.fromarray(grid).save(path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[grid], caption=[f"G_ema at {_kimg(pl_module):.1f} kimg"],
                                 step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        k = _kimg(pl_module)
        self._next_kimg = (k // self.every_kimg + 1) * self.every_kimg
        if k == 0:
            self.write(trainer, pl_module, "kimg-00000.0")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        k = _kimg(pl_module)
        if k >= self._next_kimg:
            self.write(trainer, pl_module, f"kimg-{k:07.1f}")
            self._next_kimg = (k // self.every_kimg + 1) * self.every_kimg

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "final")


class RunSummary(L.Callback):
    """Logs images/s and writes `summary.json` (run length, throughput, final losses) at the end."""

    def __init__(self, *, path: str | Path, log_every_kimg: float) -> None:
        self.path = Path(path)
        self.log_every_kimg = log_every_kimg
        self._t0 = self._t_last = 0.0
        self._images0 = self._images_last = 0
        self._next_kimg = 0.0
        self._stages: list[dict[str, Any]] = []  # progressive growing: time per stage (this session)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._images0 = self._images_last = pl_module.images_seen
        self._next_kimg = _kimg(pl_module) + self.log_every_kimg

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stage = getattr(pl_module, "schedule", None) and pl_module.schedule.at(pl_module.images_seen)
        if stage and (not self._stages or self._stages[-1]["stage"] != stage.index):
            self._stages.append({"stage": stage.index, "resolution": stage.resolution, "from_kimg": _kimg(pl_module),
                                 "_t": time.perf_counter(), "_images": pl_module.images_seen})

    def _close_stage(self, pl_module: L.LightningModule, now: float) -> None:
        """The open stage ends now (at the end of its last batch: an evaluation at the end of the run is not in it)."""
        if self._stages:
            last = self._stages[-1]
            kimg = (pl_module.images_seen - last["_images"]) / 1000.0
            seconds = now - last["_t"]
            last.update(to_kimg=_kimg(pl_module), seconds=round(seconds, 2),
                        s_per_kimg=round(seconds / kimg, 3) if kimg > 0 else None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._close_stage(pl_module, time.perf_counter())
        if _kimg(pl_module) < self._next_kimg:
            return
        now = time.perf_counter()
        rate = (pl_module.images_seen - self._images_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._images_last = now, pl_module.images_seen
        self._next_kimg = _kimg(pl_module) + self.log_every_kimg
        pl_module.log("perf/images_per_s", rate, on_step=True, prog_bar=True, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        wall = time.perf_counter() - self._t0
        images = pl_module.images_seen - self._images0
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("loss/", "D/", "reg/"))}
        summary = {
            "kimg": _kimg(pl_module),
            "images_seen": pl_module.images_seen,
            "d_steps": pl_module.d_step,
            "g_steps": pl_module.g_step,
            "world_size": trainer.world_size,
            "wall_seconds": round(wall, 2),
            "images_this_session": images,
            "images_per_s": round(images / max(wall, 1e-9), 2),
            "final": metrics,
        }
        if self._stages:  # progressive growing's stages; one for a fixed schedule
            summary["stages"] = [{k: v for k, v in s.items() if not k.startswith("_")} for s in self._stages]
        # The last evaluation of the metrics callback (pipeline/metrics/callback.py), with its protocol.
        records = [cb.history[-1] for cb in trainer.callbacks if getattr(cb, "history", None)]
        if records:
            summary["metrics"] = records[-1]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2) + "\n")
