"""Progressive growing: the schedule (stages, alpha, batch plan) and the fade-in of G and D in both architectures."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.layers.fir import downsample2d, make_filter
from pipeline.models.biggan.discriminator import Discriminator as BigGAND
from pipeline.models.biggan.generator import Generator as BigGANG
from pipeline.models.growth import resize
from pipeline.models.stylegan2.discriminator import Discriminator as StyleD
from pipeline.models.stylegan2.generator import Generator as StyleG
from pipeline.training.progressive import GrowthSchedule, batch_size_at

GROW = [8, 16, 32]


def _biggan(growth=GROW):
    kw = dict(resolution=32, channels=1, num_classes=10, attn_resolutions=[16], growth_resolutions=growth)
    return BigGANG(z_dim=120, ch=4, shared_dim=16, **kw), BigGAND(ch=4, **kw)


def _stylegan2(growth=GROW):
    kw = dict(resolution=32, channels=1, num_classes=10, channel_base=512, channel_max=16, growth_resolutions=growth)
    return StyleG(z_dim=16, w_dim=16, mapping_layers=2, noise_mode="const", **kw), StyleD(**kw)


ARCHS = {"biggan": _biggan, "stylegan2": _stylegan2}


# ---- the schedule -----------------------------------------------------------------------------
def test_stages_change_at_the_configured_kimg_and_alpha_ramps_to_one_over_the_fade():
    s = GrowthSchedule(resolutions=GROW, stage_kimg=[10, 20], fade_kimg=4)
    assert s.stage_starts_kimg == (0.0, 10.0, 30.0)
    assert [s.at(i).resolution for i in (0, 9_999, 10_000, 29_999, 30_000, 10**6)] == [8, 8, 16, 16, 32, 32]
    assert s.at(9_999).alpha == 1.0  # the first stage has nothing to fade from
    images = range(10_000, 30_000, 37)
    alphas = [s.at(i).alpha for i in images]
    assert alphas[0] == 0.0 and all(b >= a for a, b in zip(alphas, alphas[1:]))
    assert s.at(12_000).alpha == pytest.approx(0.5)  # linear: halfway through the 4-kimg fade
    assert s.at(13_999).alpha < 1.0 and s.at(14_000).alpha == 1.0 and s.at(29_999).alpha == 1.0
    assert s.at(30_000).alpha == 0.0 and s.at(34_000).alpha == 1.0


def test_fixed_schedule_is_one_stage_at_full_alpha():
    s = GrowthSchedule(resolutions=[32])
    assert not s.progressive and s.at(0) == s.at(10**9) and s.at(0).alpha == 1.0 and s.at(0).resolution == 32


def test_batch_plan_follows_per_stage_batch_sizes():
    # 2 ranks; stage 1 starts at 1000 images: batches of 64 x 2 cross it after 8 batches (1024 images).
    s = GrowthSchedule(resolutions=GROW, stage_kimg=1.0, fade_kimg=0.5, batch_size=[64, 32, 16])
    plan = s.batch_plan(batch_size=999, world=2)
    assert [(p.first_batch, p.first_images, p.batch_size) for p in plan] == [(0, 0, 64), (8, 1024, 32), (24, 2048, 16)]
    pairs = [(p.first_batch, p.batch_size) for p in plan]
    images, sizes = 0, []
    for g in range(60):  # the size of every global batch is that of the stage its first image falls in
        size = batch_size_at(pairs, g)
        assert s.batch_plan(999, 2)[s.at(images).index].batch_size == size
        sizes.append(size)
        images += size * 2
    assert s.num_batches(3000, 999, 2) == 24 + 30  # (3000 - 2048) / (16 x 2) images per batch, rounded up
    assert sum(sizes[:54]) * 2 >= 3000 > sum(sizes[:53]) * 2


@pytest.mark.parametrize("kwargs, key", [
    (dict(resolutions=[8, 32]), "double"), (dict(resolutions=[12, 24]), "powers of 2"),
    (dict(resolutions=[8, 16], stage_kimg=[1, 2]), "stage_kimg has 2 values"),
    (dict(resolutions=[8, 16, 32], stage_kimg=2, fade_kimg=3), "fade_kimg=3"),
    (dict(resolutions=[8, 16], stage_kimg=1, batch_size=[4]), "schedule.batch_size has 1 values"),
    (dict(resolutions=[8, 16], stage_kimg=1, g_lr=[1e-3, 0]), "schedule.g_lr"),
    (dict(resolutions=[8, 16], stage_kimg=0), "stage_kimg=0 must be > 0"),
])
def test_bad_schedules_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GrowthSchedule(**kwargs)


# ---- the networks -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_at_alpha_zero_g_is_the_previous_stage_upsampled_and_d_the_previous_stage_on_downsampled_input(arch):
    torch.manual_seed(0)
    G, D = ARCHS[arch]()
    z, y = torch.randn(8, G.z_dim), torch.randint(0, 10, (8,))
    for r in (16, 32):
        # Train mode (batch statistics, spectral norm's power iteration): each pass starts from the same state.
        G_prev, D_prev = copy.deepcopy(G), copy.deepcopy(D)
        G_prev.set_growth(r // 2, 1.0)
        G.set_growth(r, 0.0)
        torch.manual_seed(5)  # and the same style-mixing draws
        previous = G_prev(z, y)  # (8, 1, r/2, r/2)
        torch.manual_seed(5)
        out = G(z, y)
        assert previous.shape[-1] == r // 2 and out.shape[-1] == r
        torch.testing.assert_close(out, G.resize(previous, r), rtol=0, atol=1e-6)

        x = torch.randn(8, 1, r, r)
        D_prev.set_growth(r // 2, 1.0)
        D.set_growth(r, 0.0)
        expected = D_prev(resize(x, r // 2, D.growth_filter), y)
        torch.testing.assert_close(D(x, y), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_the_new_stage_alone_and_the_fade_is_linear_in_between(arch):
    torch.manual_seed(1)
    G, _ = ARCHS[arch]()
    G.eval()  # fixed statistics: the three passes see the same network
    z, y = torch.randn(4, G.z_dim), torch.randint(0, 10, (4,))
    G.set_growth(16, 0.0)
    at0 = G(z, y)
    G.set_growth(16, 1.0)
    at1 = G(z, y)
    G.set_growth(16, 0.25)
    torch.testing.assert_close(G(z, y), 0.75 * at0 + 0.25 * at1, rtol=0, atol=1e-6)
    assert (at1 - at0).abs().max() > 1e-3  # the new layers change the image


# Parameters of the 32x32 layers only (idle at stage 16), and the 8x8 and 16x16 outputs and inputs a fade uses.
IDLE_AT_16 = {"biggan": (("out_bn.", "out_conv.", "blocks.2."), ("blocks.0.",)),
              "stylegan2": (("synthesis.blocks.3.",), ("from_rgb.", "blocks.0."))}
FADE_AT_16 = {"biggan": (("stage_bn.", "stage_conv."), ("stage_from_rgb.",)),
              "stylegan2": (("synthesis.blocks.1.to_rgb.", "synthesis.blocks.2.to_rgb."), ("stage_from_rgb.",))}


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_above_the_stage_get_no_gradient_and_the_fading_ones_do(arch):
    torch.manual_seed(2)
    G, D = ARCHS[arch]()
    z, y = torch.randn(8, G.z_dim), torch.randint(0, 10, (8,))
    for net in (G, D):
        net.set_growth(16, 0.5)
    D(G(z, y), y).square().mean().backward()
    for net, idle, fade in zip((G, D), IDLE_AT_16[arch], FADE_AT_16[arch]):
        grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in net.named_parameters()}
        faded = [n for n in grads if n.startswith(fade)]
        assert len(faded) >= 4 and all(grads[n] for n in faded), [n for n in faded if not grads[n]]
        idle_params = [n for n in grads if n.startswith(idle)]
        assert idle_params and not any(net.get_parameter(n).grad is not None for n in idle_params)
        # Everything else below 32x32 trains (the mapping's class embedding included).
        assert all(grads[n] for n in grads if not n.startswith(idle) and "attn" not in n and "gamma" not in n), \
            [n for n in grads if not grads[n] and not n.startswith(idle)]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_fixed_schedule_builds_exactly_the_fixed_network(arch):
    G_fixed, D_fixed = ARCHS[arch](None)
    G_one, D_one = ARCHS[arch]([32])
    G_grow, D_grow = ARCHS[arch]()
    assert G_fixed.state_dict().keys() == G_one.state_dict().keys()  # checkpoints of fixed runs keep loading
    assert D_fixed.state_dict().keys() == D_one.state_dict().keys()
    assert set(D_grow.state_dict()) > set(D_fixed.state_dict())  # a fromRGB for 8x8 and one for 16x16
    # BigGAN's G gets a toRGB head per stage; StyleGAN2's already has one at every resolution.
    assert (set(G_grow.state_dict()) > set(G_fixed.state_dict())) == (arch == "biggan")


def test_g_ema_output_is_upsampled_to_the_final_size_with_the_growth_filter():
    torch.manual_seed(3)
    G, _ = _stylegan2()
    G.eval()
    z, y = torch.randn(4, G.z_dim), torch.randint(0, 10, (4,))
    G.set_growth(8, 1.0)
    small = G(z, y)
    G.set_growth(8, 1.0, output_resolution=32)
    torch.testing.assert_close(G(z, y), resize(small, 32, G.growth_filter))


def test_resize_keeps_a_constant_image_and_matches_repeated_fir_downsampling():
    f = make_filter([1, 3, 3, 1])
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(resize(x, 8, f), downsample2d(downsample2d(x, f), f))
    const = torch.full((1, 1, 32, 32), 0.3)
    assert torch.allclose(resize(const, 8, f)[..., 1:-1, 1:-1], torch.tensor(0.3), atol=1e-6)  # DC gain 1 inside
    assert resize(resize(x, 8, f), 32, f).shape == x.shape


def test_growth_resolutions_a_network_cannot_take_are_refused_with_the_key():
    with pytest.raises(ValueError, match="schedule.resolutions must end at data.resolution=32"):
        _biggan([8, 16])
    with pytest.raises(ValueError, match=r"growth_resolutions \[4\] cannot be grown.*schedule.resolutions"):
        _stylegan2([4, 8, 16, 32])
