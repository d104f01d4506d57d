"""DiffAugment's ops: numeric properties against slow references, gradients, draws and the config group."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, build, check_targets
from pipeline.data.diffaugment import DiffAugment, brightness, contrast, cutout, saturation, translate
from tests.conftest import compose_train

PAPER = DiffAugment(policy=["color", "translation", "cutout"])


def _images(n: int = 6, c: int = 3, h: int = 16, w: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Images in [-1, 1] with no exact zeros (so zeroed pixels are the op's doing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=dtype) * 2 - 1
    return torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_an_empty_policy_is_the_identity_and_draws_nothing():
    x = _images()
    state = torch.get_rng_state()
    assert DiffAugment()(x) is x and DiffAugment(policy=[])(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # augment=none leaves the run's random stream alone


@pytest.mark.parametrize("op", ["brightness", "saturation", "contrast", "translate", "cutout", "paper policy"])
def test_every_op_is_differentiable_twice(op):
    # gradcheck: the analytic Jacobian matches finite differences; gradgradcheck: R1 (create_graph) can
    # backpropagate through it. Fixed parameters with shifts and boxes that cross the borders.
    x = _images(n=2, c=2, h=5, w=6, dtype=torch.float64).requires_grad_(True)
    n = torch.tensor
    fns = {
        "brightness": lambda x: brightness(x, n([0.3, -0.2])),
        "saturation": lambda x: saturation(x, n([0.4, 1.7])),
        "contrast": lambda x: contrast(x, n([0.6, 1.4])),
        "translate": lambda x: translate(x, n([1, -2]), n([-1, 3])),
        "cutout": lambda x: cutout(x, n([0, 3]), n([5, 2]), (3, 2)),
        "paper policy": lambda x: PAPER.apply(x, PAPER.sample(x.shape, generator=_seeded(1))),
    }
    assert torch.autograd.gradcheck(fns[op], (x,))
    assert torch.autograd.gradgradcheck(fns[op], (x,))


def test_brightness_adds_one_constant_per_sample_and_its_jacobian_is_the_identity():
    aug = DiffAugment(policy=["color"])
    x = _images(n=64)
    draws = aug.sample(x.shape, generator=_seeded(0))
    shift = draws[0][1]["brightness"]
    out = brightness(x, shift)
    delta = out - x  # (N, C, H, W): one value per sample
    torch.testing.assert_close(delta, shift.view(-1, 1, 1, 1).expand_as(delta), rtol=0, atol=1e-6)
    assert -0.5 <= shift.min() and shift.max() < 0.5 and shift.std() > 0.2  # U(-0.5, 0.5): std 0.29
    x.requires_grad_(True)
    w = torch.randn_like(x)
    (grad,) = torch.autograd.grad((brightness(x, shift) * w).sum(), x)
    assert torch.equal(grad, w)  # d out / d x = I


def test_saturation_keeps_the_channel_mean_image_and_is_a_no_op_on_one_channel():
    x = _images(n=8, c=3)
    factor = torch.linspace(0.0, 2.0, 8)
    out = saturation(x, factor)
    torch.testing.assert_close(out.mean(dim=1), x.mean(dim=1), rtol=0, atol=1e-6)
    grey = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out[0], grey[0].expand(3, -1, -1), rtol=0, atol=1e-6)  # factor 0: grey
    torch.testing.assert_close(out - grey, (x - grey) * factor.view(-1, 1, 1, 1), rtol=0, atol=1e-6)
    one = _images(n=8, c=1)
    assert torch.equal(saturation(one, factor), one)


def test_contrast_keeps_the_per_sample_mean_and_scales_the_deviation():
    x = _images(n=8)
    factor = torch.linspace(0.5, 1.5, 8)
    out = contrast(x, factor)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3), keepdim=True), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(out - mean, (x - mean) * factor.view(-1, 1, 1, 1), rtol=0, atol=1e-6)


def _shift_reference(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """One image (C, H, W) moved by (dy, dx) with zero fill, pixel by pixel."""
    C, H, W = img.shape
    out = torch.zeros_like(img)
    for i in range(H):
        for j in range(W):
            if 0 <= i - dy < H and 0 <= j - dx < W:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def test_translation_is_a_zero_filled_shift_of_all_channels_by_the_drawn_amount():
    aug = DiffAugment(policy=["translation"])  # 1/8 of 16: shifts -2 ... 2
    x = _images(n=12, h=16, w=8)  # non-square: the y and x ranges differ (2 and 1)
    (_, p), = aug.sample(x.shape, generator=_seeded(3))
    out = aug(x, generator=_seeded(3))
    for k in range(len(x)):
        torch.testing.assert_close(out[k], _shift_reference(x[k], int(p["dy"][k]), int(p["dx"][k])), rtol=0, atol=0)
    many = aug.sample((4000, 1, 16, 8), generator=_seeded(4))[0][1]
    assert set(many["dy"].tolist()) == set(range(-2, 3)) and set(many["dx"].tolist()) == {-1, 0, 1}
    tiny = x[:, :, :2, :2]
    assert torch.equal(aug(tiny), tiny)  # 1/8 of 2 rounds to 0: no shift


def test_cutout_zeroes_exactly_a_clipped_box_of_the_configured_size():
    aug = DiffAugment(policy=["cutout"], cutout_ratio=0.5)  # 16 x 16 -> an 8 x 8 box; 12 x 12 -> 6 x 6
    for h, w in ((16, 16), (12, 12), (15, 9)):
        x = _images(n=400, c=2, h=h, w=w)
        (_, p), = aug.sample(x.shape, generator=_seeded(5))
        out = aug(x, generator=_seeded(5))
        sh, sw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        for k in range(len(x)):
            top, left = int(p["cy"][k]) - sh // 2, int(p["cx"][k]) - sw // 2
            box = torch.zeros(h, w, dtype=torch.bool)
            box[max(top, 0):max(top + sh, 0), max(left, 0):max(left + sw, 0)] = True
            assert torch.equal(out[k][:, box], torch.zeros_like(out[k][:, box]))
            assert torch.equal(out[k][:, ~box], x[k][:, ~box])
        # Centres 0 ... h - 1 (odd box) or 0 ... h (even box): positions symmetric about the image.
        assert set(p["cy"].tolist()) == set(range(h + 1 - sh % 2))
        full = ((out == 0).all(dim=1).sum(dim=(1, 2)) == sh * sw).float().mean()
        assert 0.1 < full < 0.9  # some boxes lie wholly inside, some are clipped


def test_the_same_seed_gives_the_same_output_and_other_seeds_or_calls_other_ones():
    x = _images()
    a, b = PAPER(x, generator=_seeded(7)), PAPER(x, generator=_seeded(7))
    assert torch.equal(a, b)
    assert not torch.allclose(a, PAPER(x, generator=_seeded(8)))
    g = _seeded(7)
    first, second = PAPER(x, generator=g), PAPER(x, generator=g)  # reals, then fakes: each its own draw
    assert torch.equal(first, a) and not torch.allclose(first, second)


def test_without_a_generator_the_draws_come_from_the_global_cpu_rng():
    # That state is what checkpoints hold (gan_module._gather_rng_states): restoring it repeats the draws.
    x = _images()
    torch.manual_seed(11)
    a = PAPER(x)
    state = torch.get_rng_state()
    b = PAPER(x)
    torch.set_rng_state(state)
    assert torch.equal(PAPER(x), b) and not torch.allclose(a, b)
    assert torch.equal(PAPER(x, generator=_seeded(11)), a)  # the same stream as a fresh seed-11 generator


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_output_keeps_the_input_dtype(dtype):
    x = _images(dtype=dtype)
    assert PAPER(x, generator=_seeded(0)).dtype == dtype


def test_the_config_group_builds_the_paper_policy_and_names_the_key_of_a_bad_one():
    assert not compose_train().get("augment")  # the default, augment=none: nothing to build
    cfg = compose_train(["augment=diffaugment"])
    check_targets(cfg)
    aug = build(cfg, "augment")
    assert (aug.policy, aug.translation_ratio, aug.cutout_ratio) == (("color", "translation", "cutout"), 0.125, 0.5)
    assert build(compose_train(["augment=diffaugment", "augment.policy=[translation,cutout]"]),
                 "augment").policy == ("translation", "cutout")
    with pytest.raises(ConfigError, match=r"augment\.policy=\['color', 'flip'\].*'flip'.*color, translation, cutout"):
        build(compose_train(["augment=diffaugment", "augment.policy=[color,flip]"]), "augment")
    with pytest.raises(ConfigError, match=r"augment\.cutout_ratio=1\.5 must lie in \[0, 1\]"):
        build(compose_train(["augment=diffaugment", "augment.cutout_ratio=1.5"]), "augment")
    with pytest.raises(ConfigError, match=r"augment\.policy='color' has the wrong type"):
        check_targets(compose_train(["augment=diffaugment", "augment.policy=color"]))
