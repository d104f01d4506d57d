"""`gan-train -m`: two tiny trials each in its own directory, each returning its final FID to the sweeper
(the basic sweeper's grid, and Optuna's TPE when the optuna extra is installed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY, wandb_records

# Each trial: 64 images, one evaluation at the end on 200 samples (about 5 s on a CPU).
TRIAL = TINY + ["train.kimg=0.064", "train.sample_every_kimg=1", "train.ckpt_every_kimg=1", "logger.mode=offline",
                "metrics=default", "metrics.every_kimg=1", "metrics.at_start=false", "metrics.num_samples=200",
                "metrics.metrics=[fid]"]
_RETURNED = re.compile(r"gan-train: sweep\.metric fid=(\S+) \((.+)\)")


def _multirun(args: list[str], out: Path, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "pipeline.train", "-m", *TRIAL, f"paths.output_dir={out}",
                           f"paths.cache_dir={cache}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _returned(proc: subprocess.CompletedProcess) -> dict[Path, float]:
    """{trial directory: the value it returned}, from the line gan-train prints in a multirun."""
    return {Path(d): float(v) for v, d in _RETURNED.findall(proc.stderr)}


def _final_fid(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["metrics"]["metrics"]["fid"]


def test_basic_sweeper_runs_each_trial_in_its_own_dir_and_returns_its_fid(tmp_path, shard_cache):
    proc = _multirun(["model.g_opt.lr=1e-4,2e-4"], tmp_path, shard_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir, = (tmp_path / "sweeps").iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]  # hydra.sweep.subdir
    assert (sweep_dir / "multirun.yaml").is_file()
    returned = _returned(proc)
    assert set(returned) == {sweep_dir / "0", sweep_dir / "1"}
    for run_dir, value in returned.items():
        assert value == pytest.approx(_final_fid(run_dir), rel=1e-5)
        trial_lr = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())[-1]
        assert trial_lr == f"model.g_opt.lr={'0.0001' if run_dir.name == '0' else '0.0002'}"
    names = {r["display_name"] for d in returned for r in wandb_records(d, "run")}
    assert len(names) == 2 and all(n.endswith(("-0", "-1")) for n in names)  # one W&B name per trial


def test_optuna_sweeper_gets_each_trials_fid(tmp_path, shard_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _multirun(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger.mode=disabled"], tmp_path,
                     shard_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir, = (tmp_path / "sweeps").iterdir()
    returned = _returned(proc)
    assert len(returned) == 2
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(returned.values()), rel=1e-5)
    assert set(results["best_params"]) == {"model.g_opt.lr", "model.d_opt.lr", "model.objective.d_steps"}


def test_optuna_sweep_without_the_metric_stops_before_training(tmp_path, shard_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _multirun(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger.mode=disabled",
                      "metrics.metrics=[accuracy]"], tmp_path, shard_cache)  # no FID to optimize
    assert proc.returncode == 2 and "sweep.metric=fid" in proc.stderr and "metrics.metrics=[fid]" in proc.stderr
    assert "Traceback" not in proc.stderr
