"""A short StyleGAN2 run through gan-train's `run`: R1, path length, EMA half-life and style mixing all execute."""
from __future__ import annotations

import torch

from pipeline.train import run
from tests.conftest import compose_train

SG2_TINY = ["model=stylegan2", "model.generator.channel_max=16", "model.discriminator.channel_max=16",
            "data.batch_size=16", "data.num_workers=0", "train.log_every_kimg=0.032"]


def test_short_stylegan2_run_applies_its_regularizers(tmp_path, shard_cache):
    cfg = compose_train(SG2_TINY + [
        "~logger", "train.kimg=0.128", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}",
        "run.name=sg2", "train.sample_every_kimg=1", "train.ckpt_every_kimg=1",
        "model.objective.r1_interval=2", "model.objective.pl_interval=2"])
    run_dir, gan = run(cfg)
    metrics = gan.trainer.callback_metrics
    assert gan.d_step == gan.g_step == 8
    assert float(metrics["reg/r1"]) > 0 and float(metrics["reg/path_length"]) > 0
    assert gan.pl_mean.item() > 0  # the running mean moved off 0
    assert any(not torch.equal(p, q) for p, q in zip(gan.G.parameters(), gan.G_ema.parameters()))
    assert (run_dir / "samples" / "final.png").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["pl_mean"].item() == gan.pl_mean.item()
