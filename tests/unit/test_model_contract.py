"""Contract: every conf/model/*.yaml composes, builds, runs G and D forward/backward, and trains every parameter."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MODEL_NAMES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
DATA = {"resolution": 32, "channels": 1, "num_classes": 10}
BATCH = 4


def _compose_model(name: str, extra: tuple[str, ...] = ()):
    """Compose conf/model/<name>.yaml with Hydra under a minimal `data` node and the fixed schedule."""
    overrides = ([f"+model={name}", "+schedule=fixed"] + [f"+data.{key}={value}" for key, value in DATA.items()]
                 + list(extra))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(overrides=overrides)


def test_model_configs_exist():
    assert "biggan" in MODEL_NAMES


VARIANTS = [(name, ()) for name in MODEL_NAMES] + [("biggan", ("model.generator.cbn_stats=per_class",))]
# StyleGAN2 with learned 2D AR noise: the AR coefficients are parameters of G too
VARIANTS += [("stylegan2", ("model.generator.noise_mode=ar", "model.generator.noise_ar.learn=true"))]


@pytest.mark.parametrize("name,extra", VARIANTS, ids=[" ".join((n, *e)) for n, e in VARIANTS])
def test_model_forward_backward_every_parameter(name, extra):
    torch.manual_seed(0)
    cfg = _compose_model(name, extra)
    assert cfg.model.name == name
    G = instantiate(cfg.model.generator).train()
    D = instantiate(cfg.model.discriminator).train()
    assert (G.resolution, G.channels, G.num_classes) == (DATA["resolution"], DATA["channels"], DATA["num_classes"])

    z = torch.randn(BATCH, G.z_dim)
    y = torch.randint(0, DATA["num_classes"], (BATCH,))
    x_real = torch.rand(BATCH, DATA["channels"], DATA["resolution"], DATA["resolution"]) * 2 - 1
    x_fake = G(z, y)
    assert x_fake.shape == x_real.shape and torch.isfinite(x_fake).all()
    fake_logits, real_logits = D(x_fake, y), D(x_real, y)
    assert fake_logits.shape == (BATCH,) and real_logits.shape == (BATCH,)
    assert torch.isfinite(fake_logits).all() and torch.isfinite(real_logits).all()

    (fake_logits.mean() + real_logits.mean()).backward()
    for net_name, net in (("G", G), ("D", D)):
        for param_name, p in net.named_parameters():
            assert p.grad is not None, f"{name}: {net_name}.{param_name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {net_name}.{param_name} has a non-finite gradient"
