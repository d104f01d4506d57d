"""gan-train with schedule=progressive: stages in logs and checkpoints, exact resume mid-fade, state carried over."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from PIL import Image

from pipeline.metrics.checkpoint import build_generator, read_checkpoint
from pipeline.train import run
from pipeline.training.checkpoints import verify_checkpoint
from tests.conftest import ROOT, TINY, SigtermAfter, checkpoint_weights, compose_train, wandb_records

# 8x8 until 0.064 kimg, 16x16 until 0.128 (fading in until 0.096), 32x32 (fading until 0.160) to the end.
GROW = ["schedule=progressive", "schedule.stage_kimg=0.064", "schedule.fade_kimg=0.032", "train.ckpt_every_kimg=0.064"]
SG2_TINY = ["model=stylegan2", "model.generator.channel_max=16", "model.discriminator.channel_max=16",
            "data.batch_size=16", "data.num_workers=0", "train.log_every_kimg=0.016", "metrics=none",
            "model.objective.r1_interval=2", "model.objective.pl_interval=2"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory, shard_cache):
    """A BigGAN run through all three stages with per-stage batch sizes and lrs, W&B offline and metrics on.

    A gan-train process of its own: W&B's service must not outlive it in the test process (a later test's
    subprocesses would inherit it and find their run ids in use)."""
    out = tmp_path_factory.mktemp("grown")
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *TINY, *GROW,
                           f"paths.output_dir={out}", f"paths.cache_dir={shard_cache}", "run.name=grow",
                           "train.kimg=0.224", "schedule.batch_size=[32,16,8]", "schedule.g_lr=[1e-3,5e-4,2e-4]",
                           "schedule.d_lr=[2e-3,1e-3,4e-4]", "logger.mode=offline", "train.log_every_kimg=0.008",
                           "train.sample_every_kimg=0.1", "metrics=default", "metrics.every_kimg=0.1",
                           "metrics.num_samples=200", "metrics.metrics=[fid,intra_fid]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "grow"


def test_the_run_goes_through_every_stage_at_the_configured_kimg(grown):
    summary = json.loads((grown / "summary.json").read_text())
    stages = summary["stages"]
    assert [(s["resolution"], s["from_kimg"], s["to_kimg"]) for s in stages] == [
        (8, 0.0, 0.064), (16, 0.064, 0.128), (32, 0.128, 0.224)]
    assert all(s["s_per_kimg"] > 0 for s in stages)
    # Batches of 32, then 16, then 8 images: 2 + 4 + 12 D steps.
    assert summary["d_steps"] == 18 and summary["images_seen"] == 224
    last = verify_checkpoint(grown / "checkpoints" / "last.ckpt")
    assert last["growth"] == {"stage": 2, "resolution": 32, "alpha": 1.0, "final_resolution": 32}


def test_wandb_logs_stage_alpha_resolution_and_the_stage_lrs(grown):
    run_dir = grown
    records = [r for r in wandb_records(run_dir) if "progress/stage" in r]
    assert records
    by_stage = {}
    for r in records:
        by_stage.setdefault(int(r["progress/stage"]), []).append(r)
    assert sorted(by_stage) == [0, 1, 2]
    for stage, resolution, g_lr, d_lr in ((0, 8, 1e-3, 2e-3), (1, 16, 5e-4, 1e-3), (2, 32, 2e-4, 4e-4)):
        rs = by_stage[stage]
        assert all(r["progress/resolution"] == resolution for r in rs)
        assert all(r["lr/G"] == pytest.approx(g_lr) and r["lr/D"] == pytest.approx(d_lr) for r in rs)
        alphas = [r["progress/alpha"] for r in sorted(rs, key=lambda r: r["progress/kimg"])]
        assert all(0.0 <= a <= 1.0 for a in alphas) and alphas == sorted(alphas)
    assert all(r["progress/alpha"] == 1.0 for r in by_stage[0])
    # Logged after the step, at the alpha the step trained with: some mid-fade values in stages 1 and 2.
    assert any(0.0 < r["progress/alpha"] < 1.0 for r in by_stage[1])
    metrics = [r for r in wandb_records(run_dir) if "metrics/fid" in r]
    assert len(metrics) >= 3 and all(r["metrics/intra_fid"] > 0 for r in metrics)


def test_samples_and_metrics_are_at_the_final_resolution_in_every_stage(grown):
    run_dir = grown
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert len(grids) >= 3  # at 0 kimg (8x8 stage), 0.1 (16x16 fade), 0.2 and the end (32x32)
    assert {Image.open(p).size for p in grids} == {(10 * 33 + 1, 10 * 33 + 1)}  # 10 columns of 32 px + borders
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 3 and records[0]["kimg"] == 0.0 and all(r["metrics"]["fid"] > 0 for r in records)


def test_checkpoints_record_the_stage_and_gan_eval_samples_at_it(grown):
    run_dir = grown
    ckpts = {p.name: verify_checkpoint(p) for p in (run_dir / "checkpoints").glob("kimg-*.ckpt")}
    growth = {name: tuple(c["growth"][k] for k in ("stage", "resolution", "alpha")) for name, c in ckpts.items()}
    # Epochs of 4 batches: 32+32+16+16 images (to 0.096 kimg, 16x16 faded in completely), then 16+16+8+8 (to
    # 0.144: halfway through the 32x32 fade, which runs 0.128-0.160), then 4 x 8 (0.176: faded in).
    assert growth["kimg-00000.096.ckpt"] == (1, 16, 1.0)
    assert growth["kimg-00000.144.ckpt"] == (2, 32, 0.5)
    assert growth["kimg-00000.176.ckpt"] == (2, 32, 1.0)
    G = build_generator(read_checkpoint(run_dir / "checkpoints" / "kimg-00000.144.ckpt"))
    assert (G.active_resolution, G.alpha, G.output_resolution) == (32, 0.5, 32)
    z, y = torch.randn(4, G.z_dim), torch.arange(4)
    assert G(z, y).shape == (4, 1, 32, 32)


@pytest.mark.parametrize("model, extra", [
    # The stream resumes on its plan of batch sizes; the resumed run sets the next stage's lr.
    ("biggan", ["schedule.batch_size=[32,16,16]", "data.num_workers=2", "schedule.g_lr=[1e-3,5e-4,2e-4]"]),
    ("stylegan2", ["precision=fp16"]),  # and both loss scalers
])
def test_a_run_stopped_mid_fade_resumes_exactly(tmp_path, shard_cache, model, extra):
    base = SG2_TINY if model == "stylegan2" else TINY
    common = base + GROW + extra + ["~logger", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}",
                                    "train.kimg=0.192", "train.sample_every_kimg=1"]
    run(compose_train(common + ["run.name=straight"]))
    # SIGTERM lands after D step 2 (BigGAN: 2 batches of 32) or 4 (16 each); the run stops one batch later, at
    # 0.080 kimg: halfway through the 16x16 fade-in.
    stop_after = 4 if model == "stylegan2" else 2
    with pytest.raises(SystemExit) as stopped:
        run(compose_train(common + ["run.name=split"]), callbacks=[SigtermAfter(stop_after)])
    assert stopped.value.code == 143
    half = verify_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert half["growth"]["resolution"] == 16 and 0.0 < half["growth"]["alpha"] < 1.0, half["growth"]
    run(compose_train(common + ["run.name=split", "resume=auto"]))
    a = checkpoint_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = checkpoint_weights(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and any(k.startswith("G.stage_") or k.startswith("D.stage_") for k in a)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


class _StageChange(L.Callback):
    """Snapshots the optimizers, loss scalers and G_ema around the first batch of every stage."""

    def __init__(self) -> None:
        self.changes: list[dict] = []
        self._stage = 0

    def _snapshot(self, gan) -> dict:
        g = gan.engines["G"]
        linear = gan.G.linear.parametrizations.weight.original  # used in every stage
        return {"g_opt": id(g.optimizer), "d_opt": id(gan.engines["D"].optimizer),
                "adam_step": float(g.optimizer.state[linear].get("step", 0)),
                "applied_g_steps": gan.g_step - g.skipped_steps,
                "scales": (g.grad_scale, gan.engines["D"].grad_scale),
                "ema": gan.G_ema.linear.parametrizations.weight.original.detach().clone(), "g": linear.detach().clone()}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        stage = pl_module.schedule.at(pl_module.images_seen).index
        if stage != self._stage and pl_module.g_step > 0:
            self._stage = stage
            self.changes.append({"before": self._snapshot(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.changes and "after" not in self.changes[-1]:
            self.changes[-1]["after"] = self._snapshot(pl_module)


def test_optimizer_state_ema_and_loss_scalers_carry_across_stage_changes(tmp_path, shard_cache):
    rec = _StageChange()
    run(compose_train(TINY + GROW + ["~logger", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}",
                                     "run.name=carry", "train.kimg=0.192", "train.sample_every_kimg=1",
                                     "precision=fp16", "precision.init_scale=131072", "model.ema.start_step=1",
                                     "model.objective.d_steps=1"]),
        callbacks=[rec])
    assert len(rec.changes) == 2  # 8 -> 16 and 16 -> 32
    for change in rec.changes:
        before, after = change["before"], change["after"]
        assert (after["g_opt"], after["d_opt"]) == (before["g_opt"], before["d_opt"])  # the same optimizers
        assert before["adam_step"] == before["applied_g_steps"] > 0  # Adam's count goes on across the change
        assert after["adam_step"] == after["applied_g_steps"] > before["adam_step"] - 1
        # The scalers have come down from 2^17 (overflows) and keep their scale: at most one more halving.
        for b, a in zip(before["scales"], after["scales"]):
            assert b < 2.0**17 and a in (b, b / 2), (b, a)
        # G_ema averages on (decay 0.99, started): it moves 1% of the way to G's new weights, not a fresh copy.
        d_ema, d_g = after["ema"] - before["ema"], after["g"] - before["ema"]
        assert float((d_ema * d_g).sum() / d_g.square().sum()) == pytest.approx(0.01, rel=1e-4)
