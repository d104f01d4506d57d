"""Two CPU processes under torchrun (gloo): weights stay identical, data differs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY, wandb_records

pytestmark = pytest.mark.distributed


def _torchrun(args: list[str], tmp_path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(29500 + os.getpid() % 1000), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


SG2_TINY = ["model=stylegan2", "model.generator.channel_max=16", "model.discriminator.channel_max=16",
            "data.batch_size=16", "data.num_workers=0", "model.objective.r1_interval=2",
            "model.objective.pl_interval=2"]


@pytest.mark.parametrize("model", ["biggan", "stylegan2"])
def test_two_ranks_keep_identical_weights_and_see_different_data(tmp_path, shard_cache, model):
    overrides = (TINY + ["model.ema.start_step=1"] if model == "biggan" else SG2_TINY) + ["train.kimg=0.32", "~logger", "run.name=ddp", f"paths.output_dir={tmp_path}",
                        f"paths.cache_dir={shard_cache}", "train.sample_every_kimg=1",
                        "train.ckpt_every_kimg=1"]
    proc = _torchrun(["tests/distributed/ddp_worker.py", str(tmp_path), *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # 0.32 kimg at 16 per rank x 2 ranks = 10 D steps; both ranks count the global images.
    # StyleGAN2 adds R1 (double backward) and path length with a cross-rank running mean.
    assert r0["images_seen"] == r1["images_seen"] == 320
    for net in ("G", "D", "G_ema"):
        assert r0[net].keys() == r1[net].keys()
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs between ranks"
    # Training moved the weights away from G_ema's copy, so identity is not trivial.
    assert any(not torch.equal(r0["G"][k], r0["G_ema"][k]) for k in r0["G"] if r0["G"][k].is_floating_point())
    assert len(r0["batches"]) == len(r1["batches"]) == 10
    assert not set(r0["batches"]) & set(r1["batches"]), "ranks trained on the same batches"


def test_torchrun_without_run_name_is_a_config_error(tmp_path, shard_cache):
    proc = _torchrun(["-m", "pipeline.train", "~logger", f"paths.output_dir={tmp_path}",
                      f"paths.cache_dir={shard_cache}"], tmp_path)
    assert proc.returncode != 0
    assert "run.name" in proc.stderr


def test_only_rank_zero_logs_to_wandb(tmp_path, shard_cache):
    proc = _torchrun(["-m", "pipeline.train", *TINY, "train.kimg=0.128", "logger.mode=offline", "run.name=logs",
                      f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "logs"
    # One W&B run for the whole job, written by rank 0 alone, with the training history in it.
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    history = wandb_records(run_dir)
    assert history and "loss/D" in set().union(*history)


def test_per_class_statistics_across_ranks_equal_one_rank_with_the_whole_batch(tmp_path):
    """Classes split over two ranks get the statistics, outputs, gradients and running statistics of one rank."""
    from tests.distributed.cbn_case import batch, layer, loss_weights

    proc = _torchrun(["tests/distributed/cbn_worker.py", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    x, y = batch()
    x.requires_grad_(True)
    bn = layer()
    out = bn(x, None, y)
    (out * loss_weights()).sum().backward()
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), x.grad, rtol=1e-5, atol=1e-5)
    for name, p in bn.named_parameters():
        torch.testing.assert_close(r0["grads"][name], p.grad, rtol=1e-5, atol=1e-5)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(r0["buffers"][name], buf)
        torch.testing.assert_close(r1["buffers"][name], buf)


def test_fp16_overflow_on_one_rank_skips_ds_step_on_every_rank(tmp_path):
    proc = _torchrun(["tests/distributed/scaler_worker.py", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):  # the inf was on rank 1 only
        assert r["stats"]["D"] == {"loss_scale": 2.0**9, "skipped_steps": 1.0}
        assert r["stats"]["G"] == {"loss_scale": 2.0**10, "skipped_steps": 0.0}
        for key, value in r["before"].items():
            if key.startswith("D."):
                assert torch.equal(value, r["after_skip"][key]), key  # D skipped on both ranks
        assert any(not torch.equal(v, r["after_skip"][k]) for k, v in r["before"].items() if k.startswith("G."))
    for key, value in r0["end"].items():  # and the ranks still agree, after one more (clean) step
        assert torch.equal(value, r1["end"][key]), key


def test_gradients_unused_on_every_rank_stay_none_and_unused_on_one_count_as_zero(tmp_path):
    proc = _torchrun(["tests/distributed/grads_worker.py", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)):
        torch.testing.assert_close(r["both"], torch.full((3,), 1.5))  # (1 + 2) / 2
        torch.testing.assert_close(r["one"], torch.full((3,), 2.0))  # (4 + 0) / 2
        assert r["none"] is None  # Adam leaves a layer that no rank used alone, as in one process


def test_two_ranks_grow_through_stage_changes_with_identical_weights(tmp_path, shard_cache):
    # Global batches of 2 x 16 (8x8) then 2 x 8: 16x16 from 0.064 kimg (fading until 0.096), 32x32 from 0.128.
    overrides = TINY + ["schedule=progressive", "schedule.stage_kimg=0.064", "schedule.fade_kimg=0.032",
                        "schedule.batch_size=[16,8,8]", "train.kimg=0.192", "~logger", "run.name=grow",
                        f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", "model.ema.start_step=1",
                        "train.sample_every_kimg=1", "train.ckpt_every_kimg=1"]
    proc = _torchrun(["tests/distributed/ddp_worker.py", str(tmp_path), *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["images_seen"] == r1["images_seen"] == 192
    assert len(r0["batches"]) == len(r1["batches"]) == 2 + 8  # 64 images in batches of 32, then 128 in 16s
    assert r0["resolutions"] == r1["resolutions"] == [8, 8, 16, 16, 16, 16, 32, 32, 32, 32]
    for net in ("G", "D", "G_ema"):
        assert r0[net].keys() == r1[net].keys() and any(".stage_" in f".{k}" for k in r0[net])
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs between ranks"
    assert not set(r0["batches"]) & set(r1["batches"]), "ranks trained on the same batches"
