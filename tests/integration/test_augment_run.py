"""augment=diffaugment in training: D judges T(x) at all three call sites, R1 differentiates through T, and a run
with it resumes exactly (its draws come from the checkpointed RNG)."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.diffaugment import DiffAugment
from pipeline.gan_module import GAN
from pipeline.models.stylegan2.discriminator import Discriminator
from pipeline.models.stylegan2.generator import Generator
from pipeline.train import run
from pipeline.training.ema import EMAHalfLife
from pipeline.training.objective import Objective
from tests.conftest import TINY, checkpoint_weights, compose_train


class _Spy:
    """A real DiffAugment that records each call's input images and its draw."""

    def __init__(self, augment: DiffAugment) -> None:
        self.augment, self.calls = augment, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        draws = self.augment.sample(x.shape)
        self.calls.append((x, draws))
        return self.augment.apply(x, draws)


def test_d_judges_augmented_reals_and_fakes_in_both_steps_and_r1_differentiates_through_t():
    torch.manual_seed(0)
    # A StyleGAN2 D: deterministic given its input (no spectral-norm power iteration), so R1 can be recomputed.
    G = Generator(resolution=16, channels=1, num_classes=3, z_dim=16, w_dim=16, channel_base=256, channel_max=16,
                  style_mixing_prob=0.0, noise_mode="const")
    D = Discriminator(resolution=16, channels=1, num_classes=3, channel_base=256, channel_max=16)
    spy = _Spy(DiffAugment(policy=["color", "translation", "cutout"]))
    adam = partial(torch.optim.Adam, lr=2e-3, betas=(0.0, 0.99))
    gan = GAN(G=G, D=D, g_opt=adam, d_opt=adam, ema=EMAHalfLife(), kimg=1000.0, augment=spy,
              objective=Objective(loss="logistic", r1_gamma=1.0, r1_interval=1))
    gan.configure_optimizers()
    logged: dict[str, torch.Tensor] = {}
    gan.log = lambda name, value, **k: logged.__setitem__(name, value)  # the Lightning plumbing, minus the Trainer
    gan.log_dict = lambda values, **k: logged.update(values)
    D_before = copy.deepcopy(D)
    x, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randint(0, 3, (8,))
    gan.training_step((x, y), 0)

    assert len(spy.calls) == 3  # D step: reals, fakes; G step: fakes
    (reals, real_draws), (fakes, _), (g_fakes, _) = spy.calls
    assert torch.equal(reals, x) and reals.requires_grad  # the un-augmented reals, which R1 differentiates
    assert not fakes.requires_grad and g_fakes.grad_fn is not None  # G's step backpropagates through T
    offsets = [torch.stack([d[2][1]["cy"], d[2][1]["cx"]]) for _, d in spy.calls]
    assert not torch.equal(offsets[0], offsets[1]) and not torch.equal(offsets[1], offsets[2])  # a draw each

    # R1 = mean_i ||d/dx_i sum D(T(x))||^2 with the step's own draw of T, through T to the un-augmented reals.
    x_req = x.clone().requires_grad_(True)
    (through,) = torch.autograd.grad(D_before(spy.augment.apply(x_req, real_draws), y).sum(), x_req)
    expected = through.square().flatten(1).sum(1).mean()
    torch.testing.assert_close(logged["reg/r1"], expected, rtol=1e-4, atol=0)
    t_x = spy.augment.apply(x, real_draws).requires_grad_(True)
    (at_t,) = torch.autograd.grad(D_before(t_x, y).sum(), t_x)  # the gradient at T(x) instead: not R1 here
    assert abs(at_t.square().flatten(1).sum(1).mean() / expected - 1) > 0.05


def test_a_run_with_diffaugment_trains_and_resumes_exactly(tmp_path, shard_cache):
    common = TINY + ["~logger", "augment=diffaugment", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}",
                     "train.ckpt_every_kimg=0.032", "train.sample_every_kimg=1", "train.kimg=0.064"]
    _, gan = run(compose_train(common + ["run.name=straight"]))
    assert isinstance(gan.augment, DiffAugment) and gan.augment.policy == ("color", "translation", "cutout")
    run(compose_train(common + ["run.name=split", "train.kimg=0.032"]))
    run(compose_train(common + ["run.name=split", "resume=auto"]))  # the second half, from the 0.032 kimg checkpoint
    a = checkpoint_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = checkpoint_weights(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_a_bad_policy_stops_the_run_naming_the_key(tmp_path, shard_cache):
    cfg = compose_train(TINY + ["~logger", "augment=diffaugment", "augment.policy=[color,hflip]",
                                f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}"])
    with pytest.raises(ConfigError, match=r"augment\.policy=.*'hflip'.*valid ops are color, translation, cutout"):
        run(cfg)
