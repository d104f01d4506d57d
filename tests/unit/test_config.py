"""Config composition and checks that name the key."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, build, check_targets
from tests.conftest import CONF, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_experiment_composes_checks_and_builds(experiment):
    cfg = compose_train([f"experiment={experiment}"] if experiment else [])
    check_targets(cfg)
    G, D = build(cfg, "model.generator"), build(cfg, "model.discriminator")
    assert G.resolution == cfg.data.resolution and G.num_classes == cfg.data.num_classes
    assert build(cfg, "train").kimg == cfg.train.kimg
    objective = build(cfg, "model.objective")
    assert objective.d_steps >= 1
    opt = build(cfg, "model.g_opt")(G.parameters())
    assert opt.param_groups[0]["lr"] == cfg.model.g_opt.lr


def test_wrong_type_names_the_key():
    cfg = compose_train(["model.generator.ch=abc"])
    with pytest.raises(ConfigError, match=r"model\.generator\.ch='abc'.*expected int"):
        check_targets(cfg)
    cfg = compose_train(["train.kimg=lots"])
    with pytest.raises(ConfigError, match=r"train\.kimg='lots'"):
        check_targets(cfg)


def test_unknown_key_in_a_target_node_names_it():
    cfg = compose_train()
    OmegaConf.set_struct(cfg, False)
    cfg.model.discriminator.chanels = 3
    with pytest.raises(ConfigError, match=r"model\.discriminator\.chanels: unknown key.*Valid keys:.*ch"):
        check_targets(cfg)


def test_impossible_resolution_names_the_key():
    cfg = compose_train(["data.resolution=48"])
    check_targets(cfg)  # types are fine; the architecture cannot make 48x48
    with pytest.raises(ConfigError, match=r"model\.generator.*resolution"):
        build(cfg, "model.generator")


def test_bad_value_in_dataclass_settings_names_the_key():
    cfg = compose_train(["train.kimg=-1"])
    with pytest.raises(ConfigError, match=r"train\.kimg=-1"):
        build(cfg, "train")
    cfg = compose_train(["model.objective.loss=wasserstein"])
    with pytest.raises(ConfigError, match=r"model\.objective.*wasserstein.*hinge"):
        build(cfg, "model.objective")


@pytest.mark.parametrize("devices, nodes, fix", [(2, 1, "trainer.devices=2 trainer.num_nodes=2"),
                                                 (4, 2, "trainer.devices=2 trainer.num_nodes=2"),
                                                 ("auto", 1, "trainer.devices=2 trainer.num_nodes=2")])
def test_trainer_devices_and_nodes_must_match_torchrun(monkeypatch, devices, nodes, fix):
    from pipeline.train import _check_world

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = compose_train([f"trainer.devices={devices}", f"trainer.num_nodes={nodes}", "run.name=x"])
    with pytest.raises(ConfigError, match=rf"!= 4 processes started by torchrun: set {fix}"):
        _check_world(cfg)
    assert _check_world(compose_train(["trainer.devices=2", "trainer.num_nodes=2", "run.name=x"])) == (4, 3)
