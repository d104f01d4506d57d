"""Cheap diagnostics during training: every `every_kimg`, on rank 0 only, log diag/* scalars and the plots.

Rank 0 alone, and nothing here communicates: the other ranks go on to the next step and wait for rank 0 in its
first all-reduce. The GAN's engines all-reduce, so G and D are called directly, never through them. One catch:
training-mode per-class cBN all-reduces its statistics, so under DDP the eig diagnostic runs G in eval mode.

The training state is left as found: the global RNG (CPU and CUDA) is forked, every module's train/eval flag
and every parameter's requires_grad are restored, and no optimizer is touched (the eig Jacobian takes
torch.autograd.grad, which does not write .grad). A diagnostic that fails warns and is skipped: it must not
end a run.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from pipeline.diagnostics.dynamics import FixedBatch
from pipeline.diagnostics.plots import PLOTS
from pipeline.diagnostics.report import (
    eig_report,
    generate,
    noise_report,
    output_spectrum_report,
    parse_what,
    scalars,
    weights_report,
)
from pipeline.distributed.sync import world_size
from pipeline.metrics.errors import EvalError
from pipeline.metrics.real_data import real_batches

CALLBACK_WHAT = ("weights", "output_spectrum", "eig", "noise")  # ppl needs a feature network: gan-diagnose only


@contextmanager
def untouched(pl_module: L.LightningModule) -> Iterator[None]:
    """Restore the global RNG, every module's training flag and every parameter's requires_grad afterwards."""
    modes = [(m, m.training) for m in pl_module.modules()]
    grads = [(p, p.requires_grad) for p in pl_module.parameters()]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, flag in grads:
                p.requires_grad_(flag)


class Diagnostics(L.Callback):
    """Every `every_kimg`: `what` of weights, output_spectrum, eig, noise -> loggers (diag/*), PNGs, jsonl."""

    def __init__(self, *, every_kimg: float, what: Sequence[str] = ("weights", "output_spectrum", "eig"),
                 num_samples: int = 256, batch_size: int = 64, eig_batch: int = 16, eig_iters: int = 10,
                 eig_k: int = 6, ar_order: int = 1, seed: int = 0, operator: bool = True, at_start: bool = False,
                 out_dir: str | None = None) -> None:
        try:
            self.what = parse_what(list(what), arg="diagnostics.what")
        except EvalError as e:
            raise ValueError(str(e)) from None
        if "ppl" in self.what:
            raise ValueError(f"diagnostics.what: ppl needs a feature network; choose from {CALLBACK_WHAT} "
                             "(gan-diagnose --what ppl scores a checkpoint)")
        if every_kimg <= 0 or min(num_samples, batch_size, eig_batch, eig_iters, eig_k, ar_order) < 1:
            raise ValueError("diagnostics.every_kimg must be > 0 and its sizes at least 1")
        self.every_kimg, self.num_samples, self.batch_size = every_kimg, num_samples, batch_size
        self.eig_batch, self.eig_iters, self.eig_k, self.ar_order = eig_batch, eig_iters, eig_k, ar_order
        self.seed, self.operator, self.at_start, self.out_dir = seed, operator, at_start, out_dir
        self._next_kimg = 0.0
        self._batch: tuple[Tensor, Tensor] | None = None  # (x, y) of the first training batch: the eig batch
        self._real: Tensor | None = None  # reals for the spectra
        self.history: list[dict[str, Any]] = []  # rank 0: {"kimg", scalars...} per evaluation

    # ---- when -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        k = pl_module.images_seen / 1000.0
        self._next_kimg = (k // self.every_kimg + 1) * self.every_kimg
        if trainer.is_global_zero and {"output_spectrum", "noise"} & set(self.what):
            shard_dir = getattr(trainer.datamodule, "shard_dir", None)
            if shard_dir is not None:  # the first num_samples reals in written order; no RNG involved
                self._real = next(iter(real_batches(shard_dir, self.num_samples, self.num_samples)))[0]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._batch is None and trainer.is_global_zero:
            x, y = batch[0][:self.eig_batch], batch[1][:self.eig_batch]  # batch = (x, y, health)
            self._batch = (x.detach().clone(), y.detach().clone())
            if self.at_start:
                self.evaluate(trainer, pl_module)
        k = pl_module.images_seen / 1000.0
        if k >= self._next_kimg:
            self.evaluate(trainer, pl_module)
            self._next_kimg = (k // self.every_kimg + 1) * self.every_kimg

    # ---- what ----------------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if not trainer.is_global_zero or self._batch is None:
            return {}
        kimg = pl_module.images_seen / 1000.0
        # kimg-XXXXX.XXX as the checkpoints: one decimal would merge evaluations of short runs
        out_dir = Path(self.out_dir or trainer.default_root_dir) / "diagnostics" / f"kimg-{kimg:09.3f}"
        reports, plots = {}, {}
        with untouched(pl_module):
            for w in self.what:
                try:
                    reports[w] = self._report(w, pl_module)
                    plots[w] = PLOTS[w](reports[w], out_dir / f"{w}.png")
                except Exception as e:  # noqa: BLE001  a diagnostic must not end the run
                    warnings.warn(f"diagnostics: {w} failed at {kimg:.1f} kimg ({type(e).__name__}: {e})",
                                  stacklevel=1)
        values = scalars(reports)
        self._log(trainer, kimg, values, plots, out_dir.parent)
        return values

    def _report(self, w: str, pl_module: L.LightningModule) -> dict:
        if w == "weights":
            return weights_report(pl_module.G, pl_module.D, operator=self.operator)
        if w == "eig":
            return self._eig(pl_module)
        fake = generate(pl_module.G_ema, self.num_samples, batch_size=self.batch_size, seed=self.seed,
                        device=pl_module.device)
        real = self._real if self._real is not None else self._batch[0].float().cpu()
        if w == "output_spectrum":
            return output_spectrum_report(fake, real)
        return noise_report(fake, real, order=self.ar_order)

    def _eig(self, pl_module: L.LightningModule) -> dict:
        G, D = pl_module.G, pl_module.D
        if world_size() > 1:
            G.eval()  # training-mode per-class cBN would all-reduce on rank 0 alone (restored by `untouched`)
        x, y = (t.to(pl_module.device) for t in self._batch)
        stage = getattr(pl_module, "stage", None)
        if stage is not None and x.shape[-1] != stage.resolution:
            x = D.resize(x, stage.resolution)
        z = torch.randn(len(x), G.z_dim, generator=torch.Generator().manual_seed(self.seed)).to(pl_module.device)
        yc = y if G.num_classes > 0 else None
        lr = {n: float(pl_module.engines[n].optimizer.param_groups[0]["lr"]) for n in ("G", "D")}
        report = eig_report(G, D, FixedBatch(x_real=x, z=z, y_real=yc, y_fake=yc), d_loss=pl_module.d_loss_fn,
                            g_loss=pl_module.g_loss_fn, lr_g=lr["G"], lr_d=lr["D"],
                            r1_gamma=pl_module.objective.r1_gamma, iters=self.eig_iters, k=self.eig_k, seed=self.seed)
        return report

    def _log(self, trainer: L.Trainer, kimg: float, values: dict[str, float], plots: dict[str, Path],
             root: Path) -> None:
        self.history.append({"kimg": kimg, **values})
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "diagnostics.jsonl", "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step SampleGrid and the metrics log at
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            if isinstance(logger, WandbLogger):
                for w, path in plots.items():
                    logger.log_image(key=f"diag/{w}", images=[str(path)], caption=[f"{w} at {kimg:.1f} kimg"],
                                     step=step)

