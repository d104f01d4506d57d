"""gan-diagnose on a tiny checkpoint, and the training callback: diag/* in W&B, identical weights without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pipeline.diagnostics.cli import main
from pipeline.diagnostics.report import WHAT
from pipeline.metrics.cli import main as gan_eval_main
from tests.conftest import ROOT, TINY, checkpoint_weights, wandb_records

DIAG = ["diagnostics=default", "diagnostics.every_kimg=0.032", "diagnostics.num_samples=32", "diagnostics.eig_iters=3",
        "diagnostics.eig_batch=8", "diagnostics.what=[weights,output_spectrum,eig,noise]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shard_cache):
    """Two 64-image BigGAN runs from the same seed: one plain, one with the diagnostics callback and W&B offline.

    gan-train processes of their own: an in-process W&B run leaves its service's environment to later tests'
    subprocesses, which then find their run ids in use."""
    root = tmp_path_factory.mktemp("diagnose")
    base = TINY + [f"paths.output_dir={root}", f"paths.cache_dir={shard_cache}", "train.kimg=0.064",
                   "train.ckpt_every_kimg=0.064", "train.sample_every_kimg=1", "model.ema.start_step=1"]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    for name, extra in (("plain", ["~logger"]), ("diag", DIAG + ["logger.mode=offline"])):
        proc = subprocess.run([sys.executable, "-m", "pipeline.train", *base, f"run.name={name}", *extra], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "cache": shard_cache, "dirs": {name: root / name for name in ("plain", "diag")}}


def test_callback_does_not_change_training(runs):
    plain = checkpoint_weights(runs["dirs"]["plain"] / "checkpoints" / "last.ckpt")
    diag = checkpoint_weights(runs["dirs"]["diag"] / "checkpoints" / "last.ckpt")
    assert plain.keys() == diag.keys()
    for k in plain:
        assert torch.equal(plain[k], diag[k]), k


def test_callback_logs_diag_scalars_and_plots(runs):
    run_dir = runs["dirs"]["diag"]
    history = [json.loads(line) for line in (run_dir / "diagnostics" / "diagnostics.jsonl").read_text().splitlines()]
    assert [h["kimg"] for h in history] == [0.032, 0.064]
    expected = {"diag/eig_radius", "diag/sigma_max/G", "diag/sigma_max/D", "diag/spectral_discrepancy",
                "diag/noise/explained_variance_fake"}
    assert expected <= history[-1].keys()
    records = wandb_records(run_dir)
    logged = set().union(*records)
    assert {"diag/eig_radius", "diag/sigma_max/G", "diag/spectral_discrepancy"} <= logged, sorted(logged)
    images = [r for r in records if "diag/eig._type" in r]  # the eig plot as a W&B image, at both evaluations
    assert len(images) == 2 and images[0]["diag/eig._type"] == "images/separated"
    for w in ("weights", "output_spectrum", "eig", "noise"):
        Image.open(run_dir / "diagnostics" / "kimg-00000.064" / f"{w}.png").verify()


def test_gan_diagnose_writes_every_report_and_plot(runs, tmp_path, capsys):
    net = tmp_path / "net.pt"  # a quick domain net for PPL's distance
    assert gan_eval_main(["fit-features", "--data", "digits", "--cache-dir", str(runs["cache"]), "--out", str(net),
                          "--epochs", "1", "--max-samples", "200", "--no-progress"]) == 0
    out = tmp_path / "diag"
    ckpt = runs["dirs"]["plain"] / "checkpoints" / "last.ckpt"
    argv = [str(ckpt), "--what", ",".join(WHAT), "--out", str(out), "--num-samples", "40", "--eig-iters", "3",
            "--eig-batch", "8", "--batch-size", "20", "--feature-net", str(net), "--cache-dir", str(runs["cache"]),
            "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "diagnostics.json").read_text())
    assert record["kimg"] == 0.064 and record["generator"] == "G_ema"
    assert set(record["reports"]) == set(WHAT)
    rep = record["reports"]
    assert set(rep["weights"]) == {"G", "D"} and all(rep["weights"][n] for n in ("G", "D"))
    assert rep["eig"]["generator"] == "G" and len(rep["eig"]["eigenvalues"]) >= 1 and rep["eig"]["radius"] > 0
    assert rep["output_spectrum"]["num_fake"] == rep["output_spectrum"]["num_real"] == 40
    assert rep["ppl"]["z"]["num_samples"] == 40 and rep["ppl"]["z"]["mean"] >= 0
    assert set(rep["noise"]) >= {"real", "fake"}
    for w in ("weights", "output_spectrum", "eig", "noise"):
        with Image.open(out / f"{w}.png") as im:
            im.verify()
    assert not (out / "ppl.png").exists()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["diag/eig_radius"] == rep["eig"]["radius"]


def test_gan_diagnose_bad_what_exits_2_naming_it(runs, tmp_path, capsys):
    ckpt = runs["dirs"]["plain"] / "checkpoints" / "last.ckpt"
    assert main([str(ckpt), "--what", "weights,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--what" in err[0] and "bogus" in err[0]
    assert main([str(tmp_path / "missing.ckpt")]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err
