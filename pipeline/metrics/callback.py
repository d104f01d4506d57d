"""Evaluate G_ema during training: every N kimg, on all ranks; log, append to metrics.jsonl, keep best.ckpt.

Each rank generates its slice of the samples with its own latents and embeds them; the features are
all-gathered (gloo on CPU, NCCL on GPUs) and rank 0 scores them against the cached reference. The
scores are broadcast back so that every rank takes the same best-checkpoint decision, because
saving a checkpoint is collective (the GAN's on_save_checkpoint gathers every rank's RNG state).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.distributed.sync import world_size
from pipeline.metrics.evaluate import (check_metrics, compute_scores, fake_features, parse_metrics, protocol,
                                       stratified_labels, truncation_mode)
from pipeline.metrics.features import FeatureNet, resolve_feature_net
from pipeline.metrics.real_data import class_counts
from pipeline.metrics.reference import Reference, reference_features
from pipeline.training.standing_stats import standing_copy

# The value each metric name yields, for best_metric (kid -> kid; pr -> precision and recall).
METRIC_VALUES = {"fid": ["fid"], "kid": ["kid"], "pr": ["precision", "recall"], "intra_fid": ["intra_fid"],
           "accuracy": ["accuracy"]}


def _gather(t: Tensor, device: torch.device) -> Tensor:
    """Concatenate equal-sized tensors from all ranks in rank order (on `device` for NCCL), returned on CPU."""
    if world_size() == 1:
        return t
    t = t.to(device).contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


def _broadcast(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MetricsCallback(L.Callback):
    """Scores G_ema every `every_kimg` (and at the end); keeps `checkpoints/best.ckpt` by `best_metric`.

    feature_net: a `gan-eval fit-features` file, InceptionV3 weights, 'inception' ($GAN_PIPELINE_INCEPTION),
    or null: the domain network for the embedded digits (fitted into cache_dir once), InceptionV3 otherwise.
    """

    def __init__(self, *, every_kimg: float, metrics: list[str], num_samples: int, feature_net: str | None = None,
                 best_metric: str | None = None, mode: Literal["min", "max"] = "min", truncation: float | None = None,
                 seed: int = 0, batch_size: int = 250, k: int = 3, kid_subsets: int = 100,
                 max_real: int | None = None, cache_dir: str | None = None, out_dir: str | None = None,
                 at_start: bool = True, at_end: bool = True, standing_stats: int = 0) -> None:
        self.metrics = parse_metrics(list(metrics), arg="metrics.metrics")
        if standing_stats < 0:
            raise ValueError(f"metrics.standing_stats={standing_stats} must be >= 0 batches (0 turns it off)")
        self.standing_stats = standing_stats
        if every_kimg <= 0 or num_samples < 2:
            raise ValueError(f"metrics.every_kimg={every_kimg} must be > 0 and metrics.num_samples={num_samples} "
                             "at least 2")
        produced = [v for m in self.metrics for v in METRIC_VALUES[m]]
        if best_metric is not None and best_metric not in produced:
            raise ValueError(f"metrics.best_metric={best_metric!r} is not computed; choose from {produced} "
                             "or add its metric to metrics.metrics")
        if mode not in ("min", "max"):
            raise ValueError(f"metrics.mode={mode!r}: use min or max")
        self.every_kimg, self.num_samples, self.feature_net = every_kimg, num_samples, feature_net
        self.best_metric, self.mode, self.truncation, self.seed = best_metric, mode, truncation, seed
        self.batch_size, self.k, self.kid_subsets, self.max_real = batch_size, k, kid_subsets, max_real
        self.cache_dir, self.out_dir, self.at_start, self.at_end = cache_dir, out_dir, at_start, at_end
        self.best: dict[str, Any] = {}  # {"value", "kimg"}; checkpointed, so a resumed run keeps its best
        self.history: list[dict[str, Any]] = []  # records of this session (rank 0)
        self._next_kimg = every_kimg
        self._last_kimg: float | None = None
        self._net: FeatureNet | None = None
        self._ref: Reference | None = None

    # ---- state across resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))

    # ---- when -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)  # a bad feature network or metric fails now, not after hours
        k = pl_module.images_seen / 1000.0
        self._next_kimg = (k // self.every_kimg + 1) * self.every_kimg
        if self.at_start and k == 0:  # the untrained G: the baseline every later value is read against
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        k = pl_module.images_seen / 1000.0
        if k >= self._next_kimg:
            self.evaluate(trainer, pl_module)
            self._next_kimg = (k // self.every_kimg + 1) * self.every_kimg

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and self._last_kimg != pl_module.images_seen / 1000.0:
            self.evaluate(trainer, pl_module)

    # ---- what ----------------------------------------------------------------------------------------
    def _run_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.out_dir or trainer.default_root_dir)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Feature network on every rank (the first fits the digits network, the others wait on its lock)."""
        dm = trainer.datamodule
        self._manifest, self._shard_dir = dm.manifest, dm.shard_dir
        self._cache = self.cache_dir or dm.cache_dir
        net = resolve_feature_net(self.feature_net, manifest=self._manifest, shard_dir=self._shard_dir,
                                  cache_dir=self._cache, progress=False)
        net.check_input(self._manifest["channels"], self._manifest["resolution"], "the training data")
        num_classes = pl_module.G_ema.num_classes
        check_metrics(self.metrics, num_classes=num_classes, net=net, arg="metrics.metrics",
                      num_samples=self.num_samples, class_counts=class_counts(self._manifest) if num_classes else [],
                      samples_arg="metrics.num_samples")
        self._net = net.to(pl_module.device)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score G_ema now; returns the values (on every rank)."""
        t0 = time.perf_counter()
        if self._net is None:
            self._prepare(trainer, pl_module)
        G, rank, world = pl_module.G_ema, trainer.global_rank, world_size()
        # A copy when standing statistics are asked for: G_ema's own statistics keep following G.
        G = standing_copy(G, num_batches=self.standing_stats, batch_size=self.batch_size, seed=self.seed,
                          truncation=self.truncation if truncation_mode(G) == "z_threshold" else None)
        counts = class_counts(self._manifest) if G.num_classes > 0 else []
        per_rank = math.ceil(self.num_samples / world)  # equal slices: all_gather needs equal sizes
        labels = stratified_labels(per_rank * world, counts)[rank * per_rank:(rank + 1) * per_rank]
        feats, logits, labels = fake_features(G, self._net, labels, truncation=self.truncation,
                                              seed=self.seed * 1000 + rank, batch_size=self.batch_size,
                                              device=pl_module.device, progress=False)
        feats, labels = _gather(feats, pl_module.device), _gather(labels, pl_module.device)
        logits = _gather(logits, pl_module.device) if logits is not None else None
        values: dict[str, Any] | None = None
        if rank == 0:
            try:
                values = self._score_and_record(trainer, pl_module, feats, logits, labels, len(counts),
                                                per_rank * world, t0)
            except Exception as e:  # tell the other ranks, which would otherwise wait in the broadcast forever
                values = {"__error__": f"{type(e).__name__}: {e}"}
        values = _broadcast(values)
        if "__error__" in values:
            raise RuntimeError(f"metrics evaluation failed on rank 0: {values['__error__']}")
        self._last_kimg = pl_module.images_seen / 1000.0
        self._keep_best(trainer, pl_module, values)
        return values

    def _score_and_record(self, trainer: L.Trainer, pl_module: L.LightningModule, feats: Tensor,
                          logits: Tensor | None, labels: Tensor, num_classes: int, n: int, t0: float
                          ) -> dict[str, float]:
        if self._ref is None:  # rank 0 only; cached on disk after the first run
            self._ref = reference_features(self._net, self._manifest, self._shard_dir, self._cache,
                                           max_samples=self.max_real, batch_size=self.batch_size,
                                           device=pl_module.device, progress=False)
        values, details = compute_scores(self.metrics, self._ref, feats, logits, labels, num_classes=num_classes,
                                         k=self.k, kid_subsets=self.kid_subsets, seed=self.seed)
        kimg = pl_module.images_seen / 1000.0
        record = {"kimg": kimg, "metrics": values,
                  "protocol": protocol(net=self._net, ref=self._ref, num_samples=n, generator="G_ema",
                                       truncation=self.truncation, truncation_kind=truncation_mode(pl_module.G_ema),
                                       kimg=kimg, seed=self.seed, details={**details, "world_size": world_size(),
                                                             "standing_stats": self.standing_stats or None}),
                  "wall_seconds": round(time.perf_counter() - t0, 2)}
        self.history.append(record)
        run_dir = self._run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step SampleGrid logs at, for W&B
        for logger in trainer.loggers:
            logger.log_metrics({f"metrics/{name}": v for name, v in values.items()}, step=step)
        summary = ", ".join(f"{m}={values[m]:.4g}" for m in values if "/" not in m and m != "kid_std")
        print(f"metrics at {kimg:.1f} kimg: {summary}", file=sys.stderr)
        return values

    def _keep_best(self, trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, float]) -> None:
        if self.best_metric is None:
            return
        value = values[self.best_metric]
        old = self.best.get("value")
        if old is not None and (value >= old if self.mode == "min" else value <= old):
            return
        self.best = {"metric": self.best_metric, "value": value, "kimg": pl_module.images_seen / 1000.0}
        path = self._run_dir(trainer) / "checkpoints" / "best.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank calls it, rank 0 writes
        if trainer.is_global_zero:
            path.with_suffix(".eval.json").write_text(json.dumps({**self.best, "record": self.history[-1]},
                                                                 indent=2) + "\n")
