"""DeepSpeed engines for G and D on 2 CPU processes (gloo, bf16): ZeRO-1 and ZeRO-2 keep the ranks in sync, and a
checkpoint resumes exactly, driven step by step and through gan-train's Trainer."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY
from tests.distributed.test_ddp import _torchrun

pytestmark = pytest.mark.distributed
pytest.importorskip("deepspeed")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_ranks_stay_in_sync_and_a_checkpoint_resumes_exactly(tmp_path, stage):
    proc = _torchrun(["tests/distributed/engine_worker.py", str(tmp_path), "deepspeed", str(stage), "bf16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["counters"] == r1["counters"] == (6, 6, 6 * 8 * 2)  # 6 D and 6 G steps of 8 images on 2 ranks
    for key, straight in r0["straight"].items():
        # Each rank updates its ZeRO partition of the fp32 master weights and all-gathers the bf16 ones:
        # every rank ends with the same bits. The resumed run took back its own partition from the file.
        assert torch.equal(straight, r1["straight"][key]), key
        assert torch.equal(straight, r0["resumed"][key]), key
        assert torch.equal(r1["straight"][key], r1["resumed"][key]), key
    for net in ("G.", "D.", "G_ema."):  # and every network moved from where it started
        assert any(not torch.equal(v, r0["initial"][k]) for k, v in r0["straight"].items() if k.startswith(net))


def test_gan_train_under_deepspeed_trains_checkpoints_and_resumes(tmp_path, shard_cache):
    common = TINY + ["~logger", "run.name=ds", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}",
                     "strategy=deepspeed", "strategy.zero_stage=2", "precision=bf16", "train.sample_every_kimg=1",
                     "train.ckpt_every_kimg=0.064", "model.ema.start_step=1"]
    first = _torchrun(["tests/distributed/ddp_worker.py", str(tmp_path), *common, "train.kimg=0.128"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = torch.load(tmp_path / "ds" / "checkpoints" / "last.ckpt", weights_only=True)  # plain data
    assert ckpt["counters"]["d_step"] == 4 and ckpt["counters"]["g_step"] == 2  # BigGAN: 2 D steps per G step
    for net, steps in (("G", 2), ("D", 4)):
        engine = ckpt["engines"][net]
        assert len(engine["zero"]) == 2 and engine["global_steps"] == steps  # both ranks' partitions
        assert all(p["zero_stage"] == 2 for p in engine["zero"])
    second = _torchrun(["tests/distributed/ddp_worker.py", str(tmp_path), *common, "train.kimg=0.192", "resume=auto"],
                       tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Resuming from" in second.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["images_seen"] == r1["images_seen"] == 192  # 4 steps, then 2 more after the resume
    assert len(r0["batches"]) == 2 and r0["batches"] != r1["batches"]  # the resumed run trained; ranks saw different data
    for net in ("G", "D", "G_ema"):
        for key, value in r0[net].items():
            assert torch.equal(value, r1[net][key]), f"{net}.{key}"


def test_deepspeed_grows_through_stage_changes_with_per_stage_lrs(tmp_path, shard_cache):
    # Layers not grown yet have no gradient; ZeRO-2's gradient partitions must still line up on both ranks.
    common = TINY + ["~logger", "run.name=grow", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}",
                     "strategy=deepspeed", "strategy.zero_stage=2", "precision=bf16", "train.kimg=0.192",
                     "schedule=progressive", "schedule.stage_kimg=0.064", "schedule.fade_kimg=0.032",
                     "schedule.g_lr=[1e-3,5e-4,2.5e-4]", "train.sample_every_kimg=1", "train.ckpt_every_kimg=1",
                     "model.ema.start_step=1"]
    proc = _torchrun(["tests/distributed/ddp_worker.py", str(tmp_path), *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["resolutions"] == [8, 8, 16, 16, 32, 32]  # global batches of 2 x 16
    assert r0["g_lrs"] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    for net in ("G", "D", "G_ema"):
        for key, value in r0[net].items():
            assert torch.equal(value, r1[net][key]), f"{net}.{key}"
