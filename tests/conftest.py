"""Shared test helpers: compose the real configs and shrink them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
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
