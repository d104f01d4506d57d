"""`gan-train` end to end: outputs, the offline W&B record, resume, and config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY, wandb_records

TRAIN = [sys.executable, "-m", "pipeline.train"]


def _gan_train(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", **(env_extra or {})}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(TRAIN + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, shard_cache):
    out = tmp_path_factory.mktemp("runs")
    common = TINY + [f"paths.output_dir={out}", f"paths.cache_dir={shard_cache}", "run.name=short",
                     "train.sample_every_kimg=0.25", "train.ckpt_every_kimg=0.25", "logger.mode=offline",
                     "model.ema.start_step=2", "metrics=default", "metrics.every_kimg=0.25",
                     "metrics.num_samples=200", "metrics.metrics=[fid,accuracy]"]
    first = _gan_train(common + ["train.kimg=0.5"])
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = out / "short"
    summary_first = json.loads((run_dir / "summary.json").read_text())
    second = _gan_train(common + ["train.kimg=0.8", "resume=auto"])
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, summary_first, second


def test_run_writes_samples_checkpoints_and_summary(short_run):
    run_dir, summary, _ = short_run
    assert summary["images_seen"] >= 500 and summary["kimg"] == pytest.approx(summary["images_seen"] / 1000)
    assert summary["images_per_s"] > 0 and {"loss/D", "loss/G"} <= set(summary["final"])
    grids = sorted((run_dir / "samples").glob("*.png"))
    names = {g.name for g in grids}
    assert "kimg-00000.0.png" in names and "final.png" in names and len(grids) >= 4
    img = Image.open(run_dir / "samples" / "final.png")
    # one row per class (10), samples_per_class columns (10), 32x32 tiles with 1-pixel padding
    assert img.size == (10 * 33 + 1, 10 * 33 + 1)
    ckpts = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("kimg-") for n in ckpts)


def test_metrics_during_training_reach_summary_and_keep_the_best_checkpoint(short_run):
    run_dir, first, _ = short_run
    record = first["metrics"]  # the evaluation at the end of the first session
    assert record["kimg"] == pytest.approx(first["kimg"]) and {"fid", "accuracy"} <= set(record["metrics"])
    assert record["protocol"]["num_samples"] == 200 and record["protocol"]["generator"] == "G_ema"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # at the start of the fresh run, every 0.25 kimg (batch 16: the first step past each multiple), and at
    # the end of each session
    assert [r["kimg"] for r in lines] == pytest.approx([0.0, 0.256, 0.512, 0.752, 0.8])
    best = json.loads((run_dir / "checkpoints" / "best.eval.json").read_text())
    assert best["value"] == pytest.approx(min(r["metrics"]["fid"] for r in lines))
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_checkpoint_is_plain_data_with_config_counters_and_rng(short_run):
    run_dir, _, _ = short_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled code
    assert ckpt["config"]["model"]["name"] == "biggan" and ckpt["config"]["train"]["kimg"] == 0.8
    assert ckpt["counters"]["images_seen"] >= 800
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("G.") for k in keys) and any(k.startswith("G_ema.") for k in keys)
    assert any(k.startswith("D.") for k in keys)
    # Each network's engine: Adam's state for every parameter (all of them train) and the loss scaler's.
    for net in ("G", "D"):
        engine = ckpt["engines"][net]
        params = [i for group in engine["optimizer"]["param_groups"] for i in group["params"]]
        assert len(params) > 10 and set(engine["optimizer"]["state"]) == set(params)
        assert engine["scaler"] == {} and engine["skipped_steps"] == 0  # fp32: no scaler
    assert len(ckpt["rng"]) == 1 and "torch" in ckpt["rng"][0]


def test_resume_continues_counters_and_wandb_run(short_run):
    run_dir, first, second = short_run
    assert "Resuming from" in second.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["images_seen"] >= 800
    # The resumed session only trained the remainder, continuing the step counters.
    assert summary["images_this_session"] == summary["images_seen"] - first["images_seen"]
    assert summary["d_steps"] == summary["images_seen"] // 16
    runs = list(run_dir.glob("wandb/offline-run-*"))
    assert len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1, "the resumed run must keep its W&B run id"


def test_offline_wandb_record_has_losses_rates_and_images(short_run):
    run_dir, _, _ = short_run
    records = wandb_records(run_dir)
    keys = set().union(*records)
    for key in ("loss/D", "loss/G", "D/real", "D/fake", "lr/G", "lr/D", "progress/kimg", "perf/images_per_s",
                "grad_norm/G", "grad_norm/D", "sn_sigma/G_max", "sn_sigma/D_max", "memory/peak_rss_mb",
                "metrics/fid", "metrics/accuracy"):
        assert key in keys, f"{key} missing from the W&B history: {sorted(keys)}"
    images = [r for r in records if "samples._type" in r]
    assert images and all(r["samples._type"] == "images/separated" and r["samples.format"] == "png" for r in images)
    # one grid per sample interval (0, 0.25, 0.5 kimg, final) in the first session, more after the resume
    assert len(images) >= 4 and images[0]["samples.height"] == 10 * 33 + 1
    lr_g = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["config"]["model"]["g_opt"]["lr"]
    assert all(r["lr/G"] == pytest.approx(lr_g) for r in records if "lr/G" in r)
    kimgs = [r["progress/kimg"] for r in records if "progress/kimg" in r]
    assert max(kimgs) >= 0.8


def test_offline_wandb_run_has_name_group_tags_and_the_resolved_config(short_run):
    run_dir, _, _ = short_run
    runs = wandb_records(run_dir, "run")
    assert runs and {r["display_name"] for r in runs} == {"short"}  # run.name
    assert {r["run_group"] for r in runs} == {"biggan-digits"}  # logger.group: ${model.name}-${data.name}
    assert all(r["tags"] == ["biggan", "digits"] for r in runs)
    config = {}
    for r in wandb_records(run_dir, "config"):
        config.update(r["update"])
    ckpt_config = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["config"]
    # the full resolved config, interpolations filled in, as the checkpoint stores it
    assert config["model"]["g_opt"]["lr"] == ckpt_config["model"]["g_opt"]["lr"]
    assert config["model"]["generator"]["num_classes"] == 10 and config["data"]["batch_size"] == 16
    assert config["metrics"]["every_kimg"] == 0.25


def test_console_scripts_find_their_configs():
    """The installed `gan-train` resolves conf/ like `python -m pipeline.train` does."""
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "gan-train"), "--cfg", "job", "train.kimg=7"], cwd="/", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kimg: 7" in proc.stdout and "_target_: pipeline.models.biggan.generator.Generator" in proc.stdout
    proc = subprocess.run([str(bin_dir / "gan-shards"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--shard-size" in proc.stdout


@pytest.mark.parametrize("override, key", [
    (["model.generator.ch=abc"], "model.generator.ch"),
    (["data.resolution=48"], "resolution"),
    (["model.generator.nonexistent=1"], "nonexistent"),
    (["train.kimg=-3"], "train.kimg"),
    (["data.num_classes=5"], "data.num_classes=10"),
    (["model.objective.pl_weight=2"], "pl_weight"),  # path length needs StyleGAN2's mapping  # disagrees with the shard manifest: says what to set
])
def test_bad_override_exits_nonzero_naming_the_key(override, key, tmp_path, shard_cache):
    proc = _gan_train(override + [f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", "~logger"])
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
