"""Mixed precision: one dynamic loss scaler per network, gradient penalties under scaling, clipping, resume.

fp16's unit roundoff is u = 2^-11 ~ 4.9e-4 and its smallest subnormal 2^-24 ~ 6e-8. Through the tiny D
(about ten layers forward and back) the measured relative error of R1 is 1.6e-3 to 2e-3, i.e. a few u:
the tolerance 1e-2 (20 u) allows for that and no more.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.distributed.backend import DDPBackend, DeepSpeedBackend
from pipeline.distributed.engine import LossScaleError, NonFiniteError, TorchEngine
from pipeline.distributed.precision import Precision
from pipeline.losses.regularizers import r1_penalty
from pipeline.models.stylegan2.discriminator import Discriminator
from tests.distributed.engine_case import checkpoint, restore, tiny_gan, train, weights

FP16 = Precision(mode="fp16")
FP16_RTOL = 1e-2


def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _poison_next_d_step(gan) -> torch.utils.hooks.RemovableHandle:
    """An inf in one of D's gradients at its next backward. The G step computes no D gradients (D is frozen)."""
    return next(gan.D.parameters()).register_hook(lambda g: torch.full_like(g, math.inf))


def _changed(before: dict[str, torch.Tensor], net: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in net.named_parameters())


def test_d_overflow_skips_and_halves_only_ds_scale():
    gan = tiny_gan(precision=FP16, r1_gamma=0.0, pl_weight=0.0)
    d, g = gan.engines["D"], gan.engines["G"]
    train(gan, range(0, 1))  # a clean step first: both scales stay at 2^16
    assert (d.grad_scale, g.grad_scale) == (2.0**16, 2.0**16)
    d_before, g_before = _params(gan.D), _params(gan.G)
    handle = _poison_next_d_step(gan)
    train(gan, range(1, 2))
    handle.remove()
    assert d.grad_scale == 2.0**15 and d.skipped_steps == 1  # D: halved, step skipped
    assert all(torch.equal(d_before[k], v) for k, v in gan.D.named_parameters())
    assert d.optimizer.state[next(gan.D.parameters())]["step"] == 1  # Adam did not advance either
    assert g.grad_scale == 2.0**16 and g.skipped_steps == 0 and _changed(g_before, gan.G)  # G: untouched, stepped
    assert gan.d_step == 2  # the schedule moves on
    train(gan, range(2, 3))  # clean again: D steps at its lower scale
    assert _changed(d_before, gan.D) and d.grad_scale == 2.0**15 and d.skipped_steps == 1


def test_scales_grow_after_growth_interval_clean_steps():
    # R1 and path length run every other step. At 2^16 path length overflows G's fp16 backward (the scaler
    # would back off, as it should); 2^10 keeps every step clean.
    gan = tiny_gan(precision=Precision(mode="fp16", init_scale=2.0**10, growth_interval=2))
    train(gan, range(0, 1))
    assert gan.engines["D"].grad_scale == gan.engines["G"].grad_scale == 2.0**10
    train(gan, range(1, 2))
    assert gan.engines["D"].grad_scale == gan.engines["G"].grad_scale == 2.0**11
    assert gan.engines["D"].stats() == {"loss_scale": 2.0**11, "skipped_steps": 0.0}


def test_scale_below_min_scale_ends_the_run_naming_the_key():
    gan = tiny_gan(precision=Precision(mode="fp16", init_scale=4.0, min_scale=2.0), r1_gamma=0.0, pl_weight=0.0)
    handle = _poison_next_d_step(gan)
    train(gan, range(0, 1))  # 4 -> 2: at the floor, still allowed
    assert gan.engines["D"].grad_scale == 2.0
    with pytest.raises(LossScaleError, match=r"D's fp16 loss scale fell to 1, below precision.min_scale=2"):
        train(gan, range(1, 2))
    handle.remove()


def test_nonfinite_gradients_are_skipped_in_fp32_and_a_diverged_run_stops():
    gan = tiny_gan(precision=Precision(mode="fp32", max_nonfinite_steps=3), r1_gamma=0.0, pl_weight=0.0)
    before = _params(gan.D)
    handle = next(gan.D.parameters()).register_hook(lambda g: torch.full_like(g, math.nan))
    train(gan, range(0, 2))  # without a scaler, nothing else would stop a NaN step
    assert gan.engines["D"].stats() == {"skipped_steps": 2.0} and gan.engines["G"].stats() == {}
    with pytest.raises(NonFiniteError, match=r"D's gradients were not finite for 3 steps in a row.*intact"):
        train(gan, range(2, 3))
    handle.remove()
    assert all(torch.equal(before[k], v) for k, v in gan.D.named_parameters())  # never trained on NaN


def _r1_fp16(D: nn.Module, x: torch.Tensor, y: torch.Tensor, mult: float, scale: float) -> float:
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = D(x, y)
    return r1_penalty(logits.float() * mult, x, grad_scale=scale).item()


@pytest.fixture(scope="module")
def d_case():
    torch.manual_seed(0)
    D = Discriminator(resolution=16, channels=1, num_classes=3, channel_base=256, channel_max=16)
    return D, torch.rand(8, 1, 16, 16) * 2 - 1, torch.randint(0, 3, (8,))


def _r1_fp32(D: nn.Module, x: torch.Tensor, y: torch.Tensor, mult: float) -> float:
    x = x.clone().requires_grad_(True)
    return r1_penalty(D(x, y) * mult, x).item()


def test_r1_under_fp16_matches_fp32(d_case):
    D, x, y = d_case
    ref = _r1_fp32(D, x, y, 1.0)
    assert _r1_fp16(D, x, y, 1.0, 256.0) == pytest.approx(ref, rel=FP16_RTOL)
    # The scale leaves the fp32 value alone (up to float rounding): it is divided out exactly.
    xs = x.clone().requires_grad_(True)
    assert r1_penalty(D(xs, y), xs, grad_scale=1024.0).item() == pytest.approx(ref, rel=1e-6)


def test_r1_scaling_keeps_small_gradients_from_underflowing(d_case):
    """With D's logits x 1e-6 the input gradients are ~1e-7 per pixel: fp16 flushes them, the scale saves them."""
    D, x, y = d_case
    ref = _r1_fp32(D, x, y, 1e-6)
    assert _r1_fp16(D, x, y, 1e-6, 1.0) == 0.0  # every gradient underflowed
    assert _r1_fp16(D, x, y, 1e-6, 2.0**16) == pytest.approx(ref, rel=FP16_RTOL)
    # Too large a scale overflows instead; the penalty is then not finite and the scaler skips that step.
    assert not math.isfinite(_r1_fp16(D, x, y, 1.0, 2.0**16))


def test_grad_clip_acts_on_unscaled_gradients():
    net = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(net.weight)
    precision = Precision(mode="fp16", init_scale=2.0**8, grad_clip=1.0)
    engine = TorchEngine("D", net, torch.optim.SGD(net.parameters(), lr=1.0), precision, "cpu")
    with engine.autocast():
        out = net(torch.ones(2, 4))
    assert engine.step(out.float().sum() * 10.0)  # gradient 20 per weight, norm 40, before clipping
    # Clipping the scaled gradients (norm 40 * 2^8) to 1 and then unscaling would move the weight by 2^-8.
    assert float(net.weight.detach().norm()) == pytest.approx(1.0, rel=FP16_RTOL)


def test_loss_scalers_and_optimizers_resume_exactly(tmp_path):
    straight = tiny_gan(precision=FP16)
    handle = _poison_next_d_step(straight)
    train(straight, range(0, 1))  # D's scaler leaves its default state: 2^15, one skipped step
    handle.remove()
    train(straight, range(1, 3))
    torch.save(checkpoint(straight), tmp_path / "mid.ckpt")
    train(straight, range(3, 6))

    resumed = tiny_gan(precision=FP16, seed=1, build_engines=False)
    restore(resumed, torch.load(tmp_path / "mid.ckpt", weights_only=True))
    assert resumed.engines["D"].stats() == {"loss_scale": 2.0**15, "skipped_steps": 1.0}
    train(resumed, range(3, 6))
    a, b = weights(straight), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("G", "D"):
        assert straight.engines[name].scaler.state_dict() == resumed.engines[name].scaler.state_dict()


def test_bf16_and_fp32_steps_have_no_scaler():
    for mode in ("fp32", "bf16"):
        gan = tiny_gan(precision=Precision(mode=mode))
        before = _params(gan.D)
        train(gan, range(0, 2))
        assert _changed(before, gan.D) and gan.engines["D"].stats() == {} and gan.engines["D"].grad_scale == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "fp8"}, "precision.mode='fp8'"),
    ({"mode": "fp16", "init_scale": 1000.0}, "power of two"),
    ({"mode": "bf16", "scope": "model"}, "precision.scope=global"),
    ({"mode": "fp16", "min_scale": 0.0}, "precision.min_scale"),
    ({"mode": "fp16", "grad_clip": -1.0}, "precision.grad_clip"),
])
def test_bad_precision_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Precision(**kwargs)


def test_deepspeed_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="precision=bf16"):
        DeepSpeedBackend().check(FP16, "cpu")
    with pytest.raises(ValueError, match="strategy=ddp"):
        DeepSpeedBackend().check(Precision(mode="fp16", scope="model"), "cuda")
    with pytest.raises(ValueError, match="growth_factor"):
        DeepSpeedBackend().check(Precision(mode="fp16", growth_factor=4.0), "cuda")
    with pytest.raises(ValueError, match="strategy.zero_stage=3"):
        DeepSpeedBackend(zero_stage=3)
    DDPBackend().check(FP16, "cpu")  # torch's GradScaler runs fp16 on CPU


def test_deepspeed_config_maps_the_scaler_settings():
    cfg = DeepSpeedBackend(zero_stage=2, hysteresis=3).config(
        Precision(mode="fp16", init_scale=2.0**12, growth_interval=500, min_scale=4.0, grad_clip=2.0))
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["gradient_clipping"] == 2.0
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                           "hysteresis": 3, "min_loss_scale": 4.0}
    assert DeepSpeedBackend().config(Precision(mode="bf16"))["bf16"] == {"enabled": True}
