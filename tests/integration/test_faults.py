"""gan-train under faults, one process: exact resume, SIGTERM, a diverged run, a corrupt last.ckpt."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.train import run
from pipeline.training.checkpoints import verify_checkpoint
from tests.conftest import ROOT, TINY, SigtermAfter, checkpoint_weights, compose_train

TRAIN = [sys.executable, "-m", "pipeline.train"]
SG2_TINY = ["model=stylegan2", "model.generator.channel_max=16", "model.discriminator.channel_max=16",
            "data.batch_size=16", "data.num_workers=0", "train.log_every_kimg=0.016", "metrics=none",
            "model.objective.r1_interval=2", "model.objective.pl_interval=2", "~logger"]


def _gan_train(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(TRAIN + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.mark.parametrize("model, stop, workers, precision", [
    ("stylegan2", "epoch_end", 0, "fp32"), ("stylegan2", "mid_epoch", 2, "fp32"), ("biggan", "mid_epoch", 0, "fp32"),
    ("biggan", "mid_epoch", 0, "fp16"),  # and the two loss scalers
    ("biggan", "last_batch", 0, "fp32"),  # SIGTERM at the epoch's last batch, before its periodic checkpoint
])
def test_a_stopped_and_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path, shard_cache, model, stop, workers,
                                                                        precision):
    # 4 batches of 16 per checkpoint "epoch", 8 in all. Stopped at the end of epoch 0 (train.kimg), or by
    # SIGTERM after batch 1 of epoch 1, where the data stream must resume inside an epoch (with 2 workers:
    # the loader's round robin must restart at the right worker), or by SIGTERM after the last batch of
    # epoch 0 (the stream must start epoch 1, and last.ckpt, written by the SIGTERM handler, be overwritten).
    base = SG2_TINY if model == "stylegan2" else TINY + ["~logger"]
    common = base + [f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", f"data.num_workers={workers}",
                     f"precision={precision}",
                     "train.ckpt_every_kimg=0.064", "train.sample_every_kimg=1", "train.kimg=0.128"]
    run(compose_train(common + ["run.name=straight"]))
    if stop == "epoch_end":
        run(compose_train(common + ["run.name=split", "train.kimg=0.064"]))
    else:
        with pytest.raises(SystemExit) as stopped:
            run(compose_train(common + ["run.name=split"]), callbacks=[SigtermAfter(5 if stop == "mid_epoch" else 3)])
        assert stopped.value.code == 143
    half = verify_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert half["counters"]["d_step"] == (6 if stop == "mid_epoch" else 4)
    if precision == "fp16":  # the scalers moved (this model overflows at 2^16), so resuming them matters
        scales = {n: half["engines"][n]["scaler"]["scale"] for n in "GD"}
        assert scales["G"] != scales["D"] and all(s < 2.0**16 for s in scales.values()), scales
    run(compose_train(common + ["run.name=split", "resume=auto"]))
    a = checkpoint_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = checkpoint_weights(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and any(k.startswith("G_ema.") for k in a)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_sigterm_writes_a_checkpoint_exits_143_and_resume_continues(tmp_path, shard_cache):
    common = TINY + ["~logger", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", "run.name=pre",
                     "train.ckpt_every_kimg=0.032", "train.sample_every_kimg=100"]
    proc = _gan_train(common + ["train.kimg=100"])
    first = tmp_path / "pre" / "checkpoints" / "kimg-00000.032.ckpt"
    deadline = time.monotonic() + 300
    while not list(first.parent.glob("kimg-*.ckpt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps past the first periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: wrote" in err and "resume=auto continues" in err
    last = verify_checkpoint(tmp_path / "pre" / "checkpoints" / "last.ckpt")
    periodic = max(verify_checkpoint(p)["counters"]["images_seen"] for p in first.parent.glob("kimg-*.ckpt"))
    assert last["counters"]["images_seen"] > periodic  # the work since the periodic checkpoint was kept
    resumed = _gan_train(common + [f"train.kimg={(last['counters']['images_seen'] + 32) / 1000}", "resume=auto"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming from" in err
    end = verify_checkpoint(tmp_path / "pre" / "checkpoints" / "last.ckpt")["counters"]
    assert end["images_seen"] == last["counters"]["images_seen"] + 32
    assert end["d_step"] == last["counters"]["d_step"] + 2


def test_a_diverging_run_stops_with_a_message_and_an_intact_checkpoint(tmp_path, shard_cache):
    # Adam moves every weight by ~lr per step: lr=1e30 sends D's activations to inf within a step or two.
    proc = _gan_train(SG2_TINY + [f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", "run.name=nan",
                                  "train.kimg=10", "train.ckpt_every_kimg=0.016", "train.sample_every_kimg=100",
                                  "model.d_opt.lr=1e30", "model.g_opt.lr=1e30", "precision.max_nonfinite_steps=3"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "gan-train: training stopped:" in err and "not finite for 3 steps in a row" in err
    ckpt = verify_checkpoint(tmp_path / "nan" / "checkpoints" / "last.ckpt")
    assert ckpt["counters"]["d_step"] >= 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())
