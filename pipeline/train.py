"""`gan-train`: compose the config, build data, G, D and the GAN module, and fit.

Reading path: this file -> pipeline/gan_module.py -> pipeline/models/<arch>/ -> pipeline/losses/.
Start it directly (`gan-train ...` or `python -m pipeline.train ...`) or under torchrun for DDP.
"""
from __future__ import annotations

import json
import math
import sys
import time
import uuid
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, build, check_targets
from pipeline.data.health import DataHealth
from pipeline.data.stream import DATA_ERROR_EXIT_CODE, DataError
from pipeline.distributed.env import launch_world
from pipeline.distributed.peers import LOST_PEER_EXIT_CODE, lost_peer, lost_peer_message
from pipeline.distributed.precision import Precision
from pipeline.gan_module import GAN
from pipeline.metrics.callback import METRIC_VALUES  # metric -> the values it yields
from pipeline.metrics.errors import EvalError
from pipeline.training.callbacks import RunSummary, SampleGrid
from pipeline.training.checkpoints import AtomicCheckpointIO, CheckpointError, find_checkpoint
from pipeline.training.host_memory import keep_freed_memory
from pipeline.training.network_stats import NetworkStats
from pipeline.training.preemption import Preemption
from pipeline.training.progressive import GrowthSchedule
from pipeline.training.sampling import FakeLabels
from pipeline.training.settings import TrainSettings

_STARTED = time.strftime("%Y-%m-%d_%H-%M-%S")


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_name(name: str | None) -> str:
    """run.name or the start time; a multirun's trials add their job number, so each has its own W&B name."""
    return f"{name or _STARTED}-{HydraConfig.get().job.num}" if _multirun() else name or _STARTED


# The run directory's name: run.name, or the start time. Under torchrun each rank composes its own config,
# so a timestamp could differ between ranks; we require run.name there (see _check_world).
OmegaConf.register_new_resolver("run_name", _run_name, replace=True)


def _check_world(cfg: DictConfig) -> tuple[int, int]:
    """Trainer devices x nodes must match the processes torchrun started; returns (world, rank)."""
    world, rank, local_world = launch_world()
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if world == 1:
        if devices not in ("auto", 1) or nodes != 1:
            raise ConfigError(f"trainer.devices={devices} trainer.num_nodes={nodes} need one process per device: "
                              "launch with `torchrun --nproc-per-node N -m pipeline.train ...`")
        return 1, 0
    if devices == "auto":
        devices = local_world
    if devices * nodes != world:
        raise ConfigError(f"trainer.devices={devices} x trainer.num_nodes={nodes} != {world} processes started by "
                          f"torchrun: set trainer.devices={local_world} trainer.num_nodes={world // local_world}")
    if cfg.run.name is None:
        raise ConfigError("run.name is required under torchrun (every rank must pick the same run directory): "
                          "add run.name=<name>")
    return world, rank


def _device_type(cfg: DictConfig) -> str:
    accelerator = str(cfg.trainer.accelerator)
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


def _check_precision(cfg: DictConfig, precision: Precision) -> None:
    """StyleGAN2's fp16 blocks (num_fp16_res) and precision.scope=model go together."""
    fp16_nets = [net for net in ("generator", "discriminator") if (cfg.model[net].get("num_fp16_res") or 0) > 0]
    if fp16_nets and precision.scope != "model":
        raise ConfigError(f"model.{fp16_nets[0]}.num_fp16_res > 0 puts blocks in fp16 inside the model: add "
                          "precision=fp16 precision.scope=model (or set num_fp16_res=0)")
    if precision.scope == "model" and not fp16_nets:
        raise ConfigError("precision.scope=model runs only the model's own fp16 blocks, and none has any: set "
                          "model.generator.num_fp16_res and model.discriminator.num_fp16_res (StyleGAN2, e.g. 4), "
                          "or precision.scope=global")


def _build_schedule(cfg: DictConfig, settings: TrainSettings) -> GrowthSchedule:
    """`schedule.*`: it must end at the data's resolution, and the run must reach its last stage."""
    schedule = build(cfg, "schedule")
    if schedule.final_resolution != cfg.data.resolution:
        n = len(schedule.resolutions)
        example = ",".join(str(cfg.data.resolution >> k) for k in range(n - 1, -1, -1))
        raise ConfigError(f"schedule.resolutions={schedule.resolutions} must end at data.resolution="
                          f"{cfg.data.resolution}: e.g. schedule.resolutions=[{example}]")
    last = schedule.stage_starts_kimg[-1]
    if last >= settings.kimg:
        raise ConfigError(f"train.kimg={settings.kimg} ends before the last stage ({schedule.final_resolution}x"
                          f"{schedule.final_resolution}) begins at {last:g} kimg: raise train.kimg or lower "
                          "schedule.stage_kimg")
    return schedule


def run(cfg: DictConfig, *, callbacks: list[L.Callback] | None = None) -> tuple[Path, GAN]:
    """Train as `cfg` says; returns the run directory and the trained module. `callbacks` are added (tests, benchmarks)."""
    check_targets(cfg)
    world, rank = _check_world(cfg)
    run_dir = (Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized()
               else Path(cfg.paths.output_dir) / (cfg.run.name or _STARTED))
    L.seed_everything(cfg.seed + rank, workers=True, verbose=False)  # different latents on each rank

    settings = build(cfg, "train")
    backend, precision = build(cfg, "strategy"), build(cfg, "precision")
    try:
        backend.check(precision, _device_type(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _check_precision(cfg, precision)
    if settings.keep_host_memory:
        keep_freed_memory()
    schedule = _build_schedule(cfg, settings)
    global_batch = cfg.data.batch_size * world
    batches_per_epoch = max(1, round(settings.ckpt_every_kimg * 1000 / global_batch))  # one "epoch" per checkpoint
    plan = schedule.batch_plan(cfg.data.batch_size, world)  # per-stage batch sizes, by global batch index
    datamodule = build(cfg, "data", batches_per_epoch=batches_per_epoch,
                       batch_plan=[(p.first_batch, p.batch_size) for p in plan] if schedule.batch_size else None)
    try:  # validates data.* against the shard manifest before anything heavy is built
        datamodule.setup("fit")
    except ValueError as e:  # the message names the data.* key and the value that fixes it
        raise ConfigError(str(e)) from e
    G = build(cfg, "model.generator")
    D = build(cfg, "model.discriminator")
    augment = build(cfg, "augment") if cfg.get("augment") else None  # augment=none composes to an empty node
    class_probs = datamodule.label_frequencies().tolist() or None  # fake labels follow the data's classes
    try:
        gan = GAN(G=G, D=D, g_opt=build(cfg, "model.g_opt"), d_opt=build(cfg, "model.d_opt"),
                  objective=build(cfg, "model.objective"), ema=build(cfg, "model.ema"), kimg=settings.kimg,
                  class_probs=class_probs, seed=cfg.seed, backend=backend, precision=precision, schedule=schedule,
                  fake_labels=build(cfg, "model.fake_labels") if cfg.model.get("fake_labels") else FakeLabels(),
                  augment=augment, config=OmegaConf.to_container(cfg, resolve=True))
    except ValueError as e:  # model/objective combinations that cannot work; the message names the key
        raise ConfigError(f"model: {e}") from e

    if cfg.model.generator.get("cbn_stats") == "per_class" and gan.fake_labels.grouping == "iid" and rank == 0:
        warnings.warn("model.generator.cbn_stats=per_class with iid fake labels: classes with fewer than "
                      "cbn_min_count samples in a batch take the fallback statistics; add "
                      "model.fake_labels.grouping=grouped", stacklevel=1)
    ckpt_path = find_checkpoint(cfg.resume, run_dir)
    id_file = run_dir / "wandb_run_id.txt"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if ckpt_path and id_file.is_file() else uuid.uuid4().hex[:8]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    logger = build(cfg, "logger", save_dir=str(run_dir), run_id=run_id) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(gan.config)

    metrics = build(cfg, "metrics") if cfg.get("metrics") else None  # metrics=none composes to an empty node
    diagnostics = build(cfg, "diagnostics") if cfg.get("diagnostics") else None  # none: an empty node
    total_batches = schedule.num_batches(round(settings.kimg * 1000), cfg.data.batch_size, world)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices if world == 1 else world // cfg.trainer.num_nodes,
        num_nodes=cfg.trainer.num_nodes, strategy=backend.lightning_strategy(world),
        precision="32-true", max_epochs=math.ceil(total_batches / batches_per_epoch),
        logger=logger, default_root_dir=str(run_dir), num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=max(1, round(settings.log_every_kimg * 1000 / global_batch)),
        enable_model_summary=rank == 0, use_distributed_sampler=False,  # webdataset splits by rank itself
        plugins=[AtomicCheckpointIO()],  # a crash during a save leaves the previous checkpoint intact
        callbacks=[
            ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="kimg-{kimg:09.3f}", auto_insert_metric_name=False,
                            save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True, save_last=True,
                            enable_version_counter=False),  # last.ckpt is also written by Preemption: overwrite it
            SampleGrid(out_dir=run_dir / "samples", every_kimg=settings.sample_every_kimg,
                       samples_per_class=settings.samples_per_class, truncation=settings.truncation,
                       seed=settings.sample_seed, standing_stats=settings.standing_stats),
            *([metrics] if metrics else []),  # before RunSummary: its final scores go into summary.json
            *([diagnostics] if diagnostics else []),
            RunSummary(path=run_dir / "summary.json", log_every_kimg=settings.log_every_kimg),
            NetworkStats(every_kimg=settings.log_every_kimg),
            DataHealth(max_bad_fraction=datamodule.max_bad_fraction, source=str(cfg.data.source)),
            Preemption(ckpt_path=run_dir / "checkpoints" / "last.ckpt", grace_s=settings.preempt_grace_s),
            *(callbacks or []),
        ],
    )
    if ckpt_path and rank == 0:
        print(f"Resuming from {ckpt_path}", file=sys.stderr)
    trainer.fit(gan, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return run_dir, gan


# An absolute path: relative ones resolve against the calling module, which differs between
# `python -m pipeline.train` and the `gan-train` console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _check_sweep_metric(cfg: DictConfig) -> None:
    """An optimizing sweeper (Optuna, not the basic grid) needs `sweep.metric` from each trial: fail before training."""
    if not _multirun() or HydraConfig.get().sweeper._target_.endswith(".BasicSweeper"):
        return
    name = cfg.sweep.metric
    computed = [v for m in (cfg.metrics.metrics if cfg.get("metrics") else []) for v in METRIC_VALUES[m]]
    if name not in computed:
        raise ConfigError(f"sweep.metric={name} is what the sweeper optimizes, but the run computes "
                          f"{computed or 'no metrics'}: add metrics=default metrics.metrics=[{name}] "
                          "(or set sweep.metric to one of them)")


def _sweep_value(cfg: DictConfig, run_dir: Path) -> float | None:
    """`sweep.metric` of the run's last metrics evaluation (RunSummary copies it into summary.json), for the sweeper."""
    name = cfg.get("sweep", {}).get("metric")
    if name is None or launch_world()[1] != 0:  # rank 0 writes summary.json
        return None
    path = run_dir / "summary.json"
    record = json.loads(path.read_text()).get("metrics") if path.is_file() else None
    value = (record or {}).get("metrics", {}).get(name)
    if value is None:
        if _multirun():
            warnings.warn(f"sweep.metric={name} was not computed (metrics=none, or not in metrics.metrics): this trial "
                          f"returns None to the sweeper; add metrics=default metrics.metrics=[{name}]", stacklevel=1)
        return None
    if _multirun():  # the basic sweeper keeps no return values: the log line is the record
        print(f"gan-train: sweep.metric {name}={value:.6g} ({run_dir})", file=sys.stderr)
    return float(value)


def _end_trial() -> None:
    """Lightning's WandbLogger reuses a live wandb.run: finish this trial's so that the next one gets its own."""
    if _multirun() and getattr(sys.modules.get("wandb"), "run", None) is not None:
        sys.modules["wandb"].finish()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run; returns `sweep.metric` (e.g. the final FID) to Hydra's sweeper under `gan-train -m`."""
    try:
        _check_sweep_metric(cfg)
        run_dir, _ = run(cfg)
    except (ConfigError, EvalError, CheckpointError) as e:  # EvalError: the metrics' feature network is unusable
        print(f"gan-train: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataError as e:  # too many bad samples; from a loader worker the message carries its traceback
        print(f"gan-train: data error: {str(e).rstrip().splitlines()[-1].removeprefix('DataError: ')}", file=sys.stderr)
        sys.exit(DATA_ERROR_EXIT_CODE)
    except FloatingPointError as e:  # a diverged run (NonFiniteError, LossScaleError): the last checkpoint is intact
        print(f"gan-train: training stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except Exception as e:
        if not lost_peer(e):
            raise
        print(f"gan-train: {lost_peer_message(e, cfg.strategy.timeout_s)}", file=sys.stderr)
        sys.exit(LOST_PEER_EXIT_CODE)
    _end_trial()
    return _sweep_value(cfg, run_dir)


def main() -> None:
    # G_ema is deliberately in eval mode; Lightning would warn about it at every start.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # The GAN's engines own its optimizers (pipeline/distributed/engine.py), so Lightning is given none.
    warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
    # The data module resumes its stream inside an epoch from Lightning's restored loop progress (see
    # ShardDataModule._start_position), not through a stateful loader.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    _hydra_main()


if __name__ == "__main__":
    main()
