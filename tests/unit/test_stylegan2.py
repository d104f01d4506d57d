"""StyleGAN2 model properties: style mixing, truncation, shapes; and its training objective wiring."""
from __future__ import annotations

import pytest
import torch

from pipeline.gan_module import GAN
from pipeline.models.stylegan2.discriminator import Discriminator, minibatch_stddev
from pipeline.models.stylegan2.generator import Generator
from pipeline.training.ema import EMAHalfLife, EMASchedule
from pipeline.training.objective import Objective


def _G(**kw) -> Generator:
    args = dict(resolution=16, channels=1, num_classes=3, z_dim=16, w_dim=16, mapping_layers=2, channel_base=256,
                channel_max=16)
    return Generator(**{**args, **kw})


def test_shapes_and_num_ws():
    G = _G(resolution=32)
    assert G.num_ws == 2 * 5 - 2  # 2 log2(R) - 2 styles: one per conv, plus the last toRGB
    x = G(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    assert x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()
    D = Discriminator(resolution=32, channels=1, num_classes=3, channel_base=256, channel_max=16)
    assert D(x, torch.tensor([0, 1, 2, 0])).shape == (4,)
    with pytest.raises(ValueError, match="resolution"):
        _G(resolution=24)


def test_style_mixing_takes_coarse_layers_from_z1_and_fine_from_z2():
    torch.manual_seed(0)
    G = _G(style_mixing_prob=1.0)
    z1, z2, y = torch.randn(64, 16), torch.randn(64, 16), torch.randint(0, 3, (64,))
    ws1, ws2 = G.mapping(z1, y), G.mapping(z2, y)
    mixed = G.mix_styles(ws1, z2, y)
    from_1 = (mixed == ws1).all(-1)  # (N, num_ws): layer taken from the first latent
    from_2 = (mixed == ws2).all(-1)
    assert (from_1 ^ from_2).all()  # each layer comes from exactly one latent
    crossover = from_1.sum(1)  # all coarse layers before the crossover come from z1, the rest from z2
    layers = torch.arange(G.num_ws)
    assert torch.equal(from_1, layers.view(1, -1) < crossover.view(-1, 1))
    assert crossover.min() >= 1 and crossover.max() <= G.num_ws - 1
    no_mix = _G(style_mixing_prob=0.0)
    no_mix.load_state_dict(G.state_dict())
    assert torch.equal(no_mix.mix_styles(ws1, z2, y), ws1)


def test_truncation_psi_zero_gives_w_avg_and_one_changes_nothing():
    G = _G()
    G.train()
    for _ in range(5):  # give w_avg a non-trivial value
        G.mapping(torch.randn(32, 16), torch.randint(0, 3, (32,)))
    G.eval()
    z, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    ws0 = G.mapping(z, y, truncation_psi=0.0)
    assert torch.allclose(ws0, G.mapping.w_avg.expand_as(ws0))
    assert torch.equal(G.mapping(z, y, truncation_psi=1.0), G.mapping(z, y))
    half = G.mapping(z, y, truncation_psi=0.5, truncation_cutoff=2)
    full = G.mapping(z, y)
    assert torch.allclose(half[:, :2], 0.5 * (full[:, :2] + G.mapping.w_avg))
    assert torch.equal(half[:, 2:], full[:, 2:])  # layers past the cutoff are untouched


def test_minibatch_stddev_appends_group_std():
    x = torch.randn(8, 4, 2, 2)
    out = minibatch_stddev(x, group_size=4)
    assert out.shape == (8, 5, 2, 2)
    y = x.reshape(4, 2, 4, 2, 2)  # groups are samples i, i+2, i+4, i+6
    expected = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (2,)
    assert torch.allclose(out[:, 4, 0, 0], expected.repeat(4), atol=1e-6)
    identical = minibatch_stddev(torch.ones(4, 2, 2, 2), group_size=4)
    assert torch.allclose(identical[:, 2], torch.full((4, 2, 2), 1e-4), atol=1e-6)  # sqrt(0 + 1e-8)


def test_lazy_regularization_adjusts_adam_and_pl_needs_a_mapping():
    from functools import partial
    G, D = _G(), Discriminator(resolution=16, channels=1, num_classes=3, channel_base=256, channel_max=16)
    adam = partial(torch.optim.Adam, lr=0.0025, betas=[0.0, 0.99])
    obj = Objective(loss="logistic", r1_gamma=0.01, r1_interval=16, pl_weight=2.0, pl_interval=4)
    gan = GAN(G=G, D=D, g_opt=adam, d_opt=adam, objective=obj, ema=EMAHalfLife(), kimg=1.0)
    gan.configure_optimizers()
    g_opt, d_opt = gan.engines["G"].optimizer, gan.engines["D"].optimizer
    assert g_opt.param_groups[0]["lr"] == pytest.approx(0.0025 * 4 / 5)
    assert d_opt.param_groups[0]["lr"] == pytest.approx(0.0025 * 16 / 17)
    assert d_opt.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (16 / 17))
    assert obj.r1.scale == pytest.approx(0.01 / 2 * 16)
    from pipeline.models.biggan.generator import Generator as BigGANG
    with pytest.raises(ValueError, match="pl_weight"):
        GAN(G=BigGANG(resolution=16, channels=1, num_classes=3, ch=8, attn_resolutions=[], z_dim=12), D=D,
            g_opt=adam, d_opt=adam, objective=obj, ema=EMASchedule(), kimg=1.0)


def test_noise_modes():
    G = _G().eval()
    for block in G.synthesis.blocks:  # give the learned noise strengths a visible value
        for layer in block.convs:
            layer.noise.strength.data.fill_(0.5)
    ws = G.mapping(torch.randn(2, 16), torch.tensor([0, 1]))
    s = G.synthesis
    assert torch.equal(s(ws, noise_mode="const"), s(ws, noise_mode="const"))  # fixed per-layer noise
    assert torch.equal(s(ws, noise_mode="none"), s(ws, noise_mode="none"))
    assert not torch.equal(s(ws, noise_mode="random"), s(ws, noise_mode="random"))
    assert not torch.equal(s(ws, noise_mode="const"), s(ws, noise_mode="none"))
    with pytest.raises(ValueError, match="noise_mode"):
        s(ws, noise_mode="loud")


def test_orig_discriminator_has_no_skips_and_bad_architecture_is_named():
    kw = dict(resolution=16, channels=1, num_classes=3, channel_base=256, channel_max=16)
    orig, resnet = Discriminator(architecture="orig", **kw), Discriminator(**kw)
    assert all(b.skip is None for b in orig.blocks) and all(b.skip is not None for b in resnet.blocks)
    # Same layers otherwise: the skips are exactly the parameter difference.
    skips = sum(p.numel() for b in resnet.blocks for p in b.skip.parameters())
    assert sum(p.numel() for p in resnet.parameters()) - sum(p.numel() for p in orig.parameters()) == skips
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    assert orig(x, y).shape == (4,)
    with pytest.raises(ValueError, match="architecture='skip'.*resnet"):
        Discriminator(architecture="skip", **kw)
