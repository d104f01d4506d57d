"""Shared test helpers: compose the real configs and shrink them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small enough for a CPU test, large enough to run every code path (attention at 16x16, hierarchy, EMA).
TINY = [
    "model.generator.ch=8", "model.discriminator.ch=8", "model.generator.shared_dim=16",
    "data.batch_size=16", "data.num_workers=0", "train.log_every_kimg=0.032",
    "metrics=none",  # tests that want metrics during training turn them on with small settings
]


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    """The composed `conf/train.yaml`, as gan-train would see it (minus the hydra node)."""
    import pipeline.train  # noqa: F401  registers the run_name resolver

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory) -> str:
    """One cache of the embedded dataset's shards for the whole session (GAN_PIPELINE_CACHE wins if set)."""
    return os.environ.get("GAN_PIPELINE_CACHE") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _no_wandb_leak(monkeypatch):
    """Keep W&B offline and out of the user's home in every test."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def wandb_records(run_dir: Path, kind: str = "history") -> list[dict]:
    """The offline run's records of one kind (history, run, config), read with wandb's own reader
    (`wandb leet inspect --json`).

    Offline runs write no wandb-summary.json; the .wandb transaction log is the record.
    """
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    wandb_cli = Path(sys.executable).with_name("wandb")
    records = []
    for f in files:
        out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(f)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        for line in out.splitlines():
            rec = json.loads(line)
            if rec.get("type") == kind:
                records.append(rec["history"]["item"] if kind == "history" else rec[kind])
    return records


class SigtermAfter(L.Callback):
    """Sends this process SIGTERM after D step `d_step`; the Preemption callback stops the run one batch later."""

    def __init__(self, d_step: int) -> None:
        self.d_step = d_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.d_step == self.d_step:
            os.kill(os.getpid(), signal.SIGTERM)


def checkpoint_weights(path) -> dict[str, torch.Tensor]:
    """G's, D's and G_ema's tensors of a checkpoint."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("G.", "D.", "G_ema."))}
