"""Sweeps: W&B sweep configs and their Hydra overrides, the sweep agent's trial -> job mapping (fake W&B agent
and launcher), the conf/hparams_search files, and the value gan-train returns to Hydra's sweeper."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
from wandb.sdk.lib import config_util

import launch
from launch import sweep
from tests.conftest import CONF, compose_train

SPECIAL = ["/data/my shards,v2", "it's", "C:\\runs\\", "[not, a, list]", "null", "1e-4", "${oc.env:HOME}"]


def _parse(override: str):
    return OverridesParser.create().parse_override(override)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sweep.add_sweep_parser(parser.add_subparsers(dest="command"))
    return sweep.run_sweep(parser.parse_args(argv))


def _compose_hydra(overrides: list[str]):
    import pipeline.train  # noqa: F401  registers the run_name resolver

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# ---- sweep config ---------------------------------------------------------------------------------------
def test_config_from_search_file_is_a_grid_over_hydra_overrides(tmp_path):
    out = tmp_path / "sweep.yaml"
    assert _cli(["sweep", "config", "--from", "lr", "--name", "lr-grid", "-o", str(out), "train.kimg=20"]) == 0
    config = yaml.safe_load(out.read_text())
    assert config["method"] == "grid" and config["name"] == "lr-grid"
    assert config["metric"] == {"name": "metrics/fid", "goal": "minimize"}  # as MetricsCallback logs it
    assert config["parameters"]["model.g_opt.lr"] == {"values": [1e-4, 2e-4, 5e-4]}
    assert config["parameters"]["model.d_opt.lr"] == {"values": [2e-4, 5e-4, 1e-3]}
    # fixed overrides first, then wandb's key=value per parameter: Hydra's override syntax
    assert config["command"] == ["${env}", "gan-train", "train.kimg=20", "${args_no_hyphens}"]


def test_optuna_search_file_becomes_bayes_with_distributions_and_run_cap(tmp_path):
    out = tmp_path / "sweep.yaml"
    assert _cli(["sweep", "config", "--from", "optuna", "-o", str(out)]) == 0  # read as YAML: no optuna needed
    config = yaml.safe_load(out.read_text())
    assert config["method"] == "bayes" and config["run_cap"] == 20
    assert config["parameters"]["model.g_opt.lr"] == {"distribution": "log_uniform_values", "min": 5e-5, "max": 2e-3}
    assert config["parameters"]["model.objective.d_steps"] == {"values": [1, 2, 4]}


@pytest.mark.parametrize("hydra_sweep, spec", [
    ("1,2", {"values": [1, 2]}),
    ("choice(a, 'b,c')", {"values": ["a", "'b,c'"]}),
    ("range(1, 4)", {"values": [1, 2, 3]}),
    ("interval(0, 1)", {"distribution": "uniform", "min": 0.0, "max": 1.0}),
    ("int(interval(1, 8))", {"distribution": "int_uniform", "min": 1, "max": 8}),
    ("tag(log, interval(1e-5, 1e-3))", {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}),
    ("0.5", {"value": 0.5}),
])
def test_hydra_sweep_syntax_maps_to_wandb_parameters(hydra_sweep, spec):
    assert sweep.wandb_parameter("model.x", hydra_sweep) == ("model.x", spec)
    assert sweep.wandb_parameter("+extra.key", hydra_sweep)[0] == "+extra.key"  # Hydra's append prefix is kept


def test_metric_goal_and_method_follow_options_and_sweep_config(tmp_path):
    out = tmp_path / "s.yaml"
    assert _cli(["sweep", "config", "--param", "model.g_opt.lr=interval(1e-4, 1e-3)", "--method", "random",
                 "-o", str(out), "sweep.metric=accuracy", "sweep.direction=maximize"]) == 0
    config = yaml.safe_load(out.read_text())
    assert config["method"] == "random" and config["metric"] == {"name": "metrics/accuracy", "goal": "maximize"}
    assert config["command"][2:4] == ["sweep.metric=accuracy", "sweep.direction=maximize"]


def test_bad_inputs_fail_naming_the_option(capsys):
    assert _cli(["sweep", "config", "--from", "nope"]) == 2
    assert "--from nope" in capsys.readouterr().err
    assert _cli(["sweep", "config", "--param", "model.g_opt.lr=interval(1e-4, 1e-3)", "--method", "grid"]) == 2
    assert "--method grid" in capsys.readouterr().err
    assert _cli(["sweep", "config", "--from", "lr", "model.nonexistent=1"]) == 2
    assert "model.nonexistent" in capsys.readouterr().err
    assert _cli(["sweep", "config", "--param", "model.g_opt.lr=choice(1,"]) == 2
    assert "model.g_opt.lr" in capsys.readouterr().err


def test_values_with_special_characters_survive_wandb_and_hydra():
    """YAML -> wandb's ${args_no_hyphens} (its own formatting code) -> Hydra's override parser: the same value."""
    values = [*SPECIAL, 3, 2.5e-5, True]
    quoted = [sweep.hydra_quote(v) if isinstance(v, str) else str(v) for v in values]  # in a Hydra choice(...)
    config = sweep.sweep_config({"data.source": f"choice({','.join(quoted)})"}, metric="fid", direction="minimize")
    spec = yaml.safe_load(yaml.safe_dump(config))["parameters"]["data.source"]
    for original, stored in zip(values, spec["values"], strict=True):
        args = create_sweep_command_args({"args": {"data.source": {"value": stored}}})["args_no_hyphens"]
        assert _parse(args[0]).value() == original, (original, stored, args)


# ---- agent ----------------------------------------------------------------------------------------------
def _fake_agent(trials: list[tuple[str, dict]], tmp_path):
    """Does what wandb.agent does for a function: per trial, env vars and the param file, then the call."""
    def agent(sweep_id, *, function, count=None, project=None, entity=None):
        for run_id, params in trials[:count]:
            path = tmp_path / f"config-{run_id}.yaml"
            config_util.save_config_file_from_dict(str(path), {k: {"value": v} for k, v in params.items()})
            os.environ.update(WANDB_RUN_ID=run_id, WANDB_SWEEP_ID=sweep_id.rsplit("/", 1)[-1],
                              WANDB_SWEEP_PARAM_PATH=str(path))
            try:
                function()
            finally:
                for key in ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH"):
                    os.environ.pop(key)
    return agent


def test_agent_starts_one_job_per_trial_with_its_overrides_name_and_wandb_run(tmp_path):
    trials = [("ab12cd34", {"model.g_opt.lr": 0.0001, "model.objective.d_steps": 2}),
              ("ef56gh78", {"model.g_opt.lr": 0.0005, "data.source": sweep.hydra_value(SPECIAL[0])}),
              ("never999", {"model.g_opt.lr": 1.0})]
    jobs = []
    names = sweep.run_agent("me/gan/Sw33p1d", overrides=["train.kimg=20"], count=2, agent=_fake_agent(trials, tmp_path),
                            launch_job=lambda name, overrides, *, env: jobs.append((name, overrides, env)))
    assert names == ["sweep-sw33p1d-ab12cd34", "sweep-sw33p1d-ef56gh78"] == [j[0] for j in jobs]
    assert all(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= 40 for n in names)  # Kubernetes names
    assert jobs[0][1] == ["train.kimg=20", "model.g_opt.lr=0.0001", "model.objective.d_steps=2"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(jobs[1][1])}
    assert parsed == {"train.kimg": 20, "model.g_opt.lr": 0.0005, "data.source": SPECIAL[0]}
    # the job's wandb.init joins the trial's run (inside a sweep wandb ignores gan-train's own run id)
    assert jobs[1][2] == {"WANDB_SWEEP_ID": "Sw33p1d", "WANDB_RUN_ID": "ef56gh78", "WANDB_PROJECT": "gan",
                          "WANDB_ENTITY": "me"}


def test_trial_overrides_format_like_wandbs_args_no_hyphens():
    params = {"model.g_opt.lr": 2.5e-05, "a.b": "'x,y'", "flag": False, "ls": [1, 2]}
    expected = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]
    assert sweep.trial_overrides(params) == expected


def test_k8s_launcher_renders_applies_and_adds_the_trial_env(monkeypatch):
    calls = {}

    def render_job(**kwargs):
        calls["render"] = kwargs
        pod = {"containers": [{"name": "trainer", "env": [{"name": "WANDB_API_KEY", "value": "from-secret"}]}]}
        return [{"kind": "Service", "metadata": {"namespace": "ml"}},
                {"kind": "Job", "metadata": {"namespace": "ml"}, "spec": {"template": {"spec": pod}}}]

    def apply(manifests, *, namespace):
        calls["apply"] = (manifests, namespace)

    fake = types.SimpleNamespace(render_job=render_job, apply=apply)
    monkeypatch.setitem(sys.modules, "launch.k8s", fake)
    monkeypatch.setattr(launch, "k8s", fake, raising=False)
    launch_job = sweep.k8s_launcher(target="indexed-job", nodes=2, gpus_per_node=8, image="img:1", namespace="ml")
    launch_job("sweep-a-b", ["model.g_opt.lr=0.001"], env={"WANDB_RUN_ID": "b", "WANDB_API_KEY": "not-this"})
    assert calls["render"] == dict(target="indexed-job", nodes=2, gpus_per_node=8, image="img:1", name="sweep-a-b",
                                   namespace="ml", overrides=["model.g_opt.lr=0.001"])
    manifests, namespace = calls["apply"]
    env = manifests[1]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert namespace == "ml" and env == [{"name": "WANDB_API_KEY", "value": "from-secret"},
                                         {"name": "WANDB_RUN_ID", "value": "b"}]


# ---- hparams_search configs and gan-train's returned value -------------------------------------------------
def test_hparams_search_is_off_by_default_and_the_grids_compose():
    assert compose_train().get("hparams_search") is None
    assert _compose_hydra([]).hydra.sweeper.get("params") in (None, {})
    r1 = _compose_hydra(["model=stylegan2", "hparams_search=r1_gamma"])
    gammas = [float(g) for g in r1.hydra.sweeper.params["model.objective.r1_gamma"].split(",")]
    default = r1.model.objective.r1_gamma
    assert gammas == pytest.approx([default / 4, default / 2, default, default * 2, default * 4])
    lr = _compose_hydra(["hparams_search=lr"]).hydra.sweeper.params
    assert set(lr) == {"model.g_opt.lr", "model.d_opt.lr"}
    assert all(_parse(f"{k}={v}").is_sweep_override() for k, v in lr.items())


def test_optuna_search_composes_with_the_sweep_direction():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose_hydra(["hparams_search=optuna", "sweep.metric=accuracy", "sweep.direction=maximize"])
    s = cfg.hydra.sweeper
    assert s._target_.endswith("OptunaSweeper") and s.sampler._target_ == "optuna.samplers.TPESampler"
    assert s.direction == "maximize" and s.study_name == "biggan-digits-accuracy" and s.n_trials == 20
    assert _parse(f"x={s.params['model.g_opt.lr']}").value().tags == {"log"}


def test_sweep_value_is_the_last_evaluations_metric(tmp_path):
    from pipeline.train import _sweep_value

    cfg = compose_train()
    assert _sweep_value(cfg, tmp_path) is None  # no summary.json (metrics off, or a crash): nothing to return
    summary = {"kimg": 1.0, "metrics": {"kimg": 1.0, "metrics": {"fid": 12.5, "accuracy": 0.75}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert _sweep_value(cfg, tmp_path) == 12.5
    assert _sweep_value(compose_train(["sweep.metric=accuracy"]), tmp_path) == 0.75
    assert _sweep_value(compose_train(["sweep.metric=null"]), tmp_path) is None


def test_the_agents_trial_becomes_a_real_rendered_job_applied_through_the_kubernetes_api(monkeypatch):
    """The default launcher with the real launch.k8s: render_job's manifests go to a fake Kubernetes API."""
    from launch.k8s import client
    from tests.unit.test_k8s import FakeApi

    api = client.Apis(core=FakeApi(), batch=FakeApi(), custom=FakeApi())
    monkeypatch.setattr(client, "default_apis", lambda: api)
    launch_job = sweep.k8s_launcher(target="indexed-job", nodes=2, gpus_per_node=4, image="img:1", namespace=None)
    launch_job("sweep-x-run1", ["model.g_opt.lr=0.001", "train.kimg=10"], env={"WANDB_RUN_ID": "run1"})
    (method, service), = api.core.calls
    (_, job), = api.batch.calls
    assert method == "create_namespaced_service" and service["namespace"] == job["namespace"] == "default"
    container = job["body"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "WANDB_RUN_ID", "value": "run1"} in container["env"]
    assert container["args"][-2:] == ["model.g_opt.lr=0.001", "train.kimg=10"]
    assert "run.name=sweep-x-run1" in container["args"]
