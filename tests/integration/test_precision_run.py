"""gan-train with precision=bf16 and fp16 (NVlabs-style fp16 blocks), and the precision configs that cannot work."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import ConfigError, build
from pipeline.train import run
from tests.conftest import ROOT, TINY, compose_train, wandb_records

SG2_TINY = ["model=stylegan2", "model.generator.channel_max=16", "model.discriminator.channel_max=16",
            "data.batch_size=16", "data.num_workers=0", "train.log_every_kimg=0.016", "metrics=none",
            "train.sample_every_kimg=1", "train.ckpt_every_kimg=1", "model.objective.r1_interval=2",
            "model.objective.pl_interval=2"]
FP16_BLOCKS = ["precision=fp16", "precision.scope=model", "precision.init_scale=1024",
               "model.generator.num_fp16_res=2", "model.discriminator.num_fp16_res=2",
               "model.generator.conv_clamp=256", "model.discriminator.conv_clamp=256"]


def _finite(net: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


def test_bf16_biggan_run(tmp_path, shard_cache):
    cfg = compose_train(TINY + ["~logger", "precision=bf16", "train.kimg=0.064", f"paths.output_dir={tmp_path}",
                                f"paths.cache_dir={shard_cache}", "run.name=bf16", "train.sample_every_kimg=1"])
    run_dir, gan = run(cfg)
    assert gan.d_step == 4 and gan.precision.mode == "bf16" and _finite(gan.G) and _finite(gan.D)
    assert not any(k.startswith("precision/") for k in gan.trainer.callback_metrics)  # no scaler to report
    assert (run_dir / "samples" / "final.png").is_file()


def test_fp16_blocks_put_the_highest_resolutions_in_fp16():
    cfg = compose_train(SG2_TINY + FP16_BLOCKS + ["data.resolution=32"])
    G, D = build(cfg, "model.generator"), build(cfg, "model.discriminator")
    assert [b.use_fp16 for b in G.synthesis.blocks] == [False, False, True, True]  # 4, 8 | 16, 32
    assert D.fp16_from_rgb and D.fp16_blocks == [True, True, False]  # 32, 16 | 8 (and the 4x4 epilogue)
    dtypes = {}
    for name, module in [("G8", G.synthesis.blocks[1].convs[-1]), ("G32", G.synthesis.blocks[3].convs[-1]),
                         ("D32", D.blocks[0].conv1), ("D8", D.blocks[2].conv1)]:
        module.register_forward_hook(lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype))
    images = G(torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3]))
    logits = D(images, torch.tensor([0, 1, 2, 3]))
    assert dtypes == {"G8": torch.float32, "G32": torch.float16, "D32": torch.float16, "D8": torch.float32}
    assert images.dtype == logits.dtype == torch.float32  # the image and the logits are fp32


def test_fp16_run_logs_each_networks_loss_scale_to_wandb_and_checkpoints_it(tmp_path, shard_cache):
    # A subprocess: an in-process W&B run would leave its service to the later gan-train subprocesses.
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *SG2_TINY, *FP16_BLOCKS, "logger.mode=offline", "train.kimg=0.064",
         f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", "run.name=fp16"],
        cwd=ROOT, env={**os.environ, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = wandb_records(tmp_path / "fp16")
    ckpt = torch.load(tmp_path / "fp16" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["counters"]["d_step"] == ckpt["counters"]["g_step"] == 4
    for net in ("G", "D"):
        scales = [r[f"precision/loss_scale_{net}"] for r in history if f"precision/loss_scale_{net}" in r]
        skipped = [r[f"precision/skipped_steps_{net}"] for r in history if f"precision/skipped_steps_{net}" in r]
        assert len(scales) == len(skipped) == 4  # logged every step
        # Each skipped step halved the scale from 1024 (no growth within 2000 steps).
        assert all(s == 1024 / 2**k for s, k in zip(scales, skipped))
        engine = ckpt["engines"][net]
        assert engine["scaler"]["scale"] == scales[-1] and engine["skipped_steps"] == skipped[-1]


@pytest.mark.parametrize("overrides, match", [
    (["model.generator.num_fp16_res=2", "model.generator.conv_clamp=256"], "precision=fp16 precision.scope=model"),
    (["precision=fp16", "precision.scope=model"], "model.generator.num_fp16_res"),
    (["precision=fp16", "precision.scope=model", "model.generator.num_fp16_res=2"], "model.generator.conv_clamp"),
    (["strategy=deepspeed", "precision=fp16"], "precision=bf16"),
    (["strategy=deepspeed", "strategy.zero_stage=3"], "strategy.zero_stage=3"),
    (["precision=bf16", "+precision.scope=model"], "precision.scope=global"),
])
def test_precision_configs_that_cannot_work_fail_at_start_naming_the_fix(tmp_path, overrides, match):
    cfg = compose_train(SG2_TINY + ["~logger", f"paths.output_dir={tmp_path}", "run.name=bad", *overrides])
    with pytest.raises(ConfigError, match=match):
        run(cfg)
