"""One training step of the GAN module, driven without a Trainer: what the G step reuses from the D step."""
from __future__ import annotations

from functools import partial

import torch

from pipeline.gan_module import GAN
from pipeline.models.stylegan2.discriminator import Discriminator
from pipeline.models.stylegan2.generator import Generator
from pipeline.training.ema import EMAHalfLife
from pipeline.training.objective import Objective


def _one_step(reuse_fakes: bool, same_latents: bool) -> tuple[dict[str, torch.Tensor], int]:
    """G's parameters after one D step + G step, and how many G forwards it took."""
    torch.manual_seed(0)
    # Deterministic given the latents: constant noise, no style mixing. (A G with spectral norm would not
    # be: every training forward advances its power iteration, so a second forward differs slightly.)
    G = Generator(resolution=16, channels=1, num_classes=3, z_dim=16, w_dim=16, channel_base=256, channel_max=16,
                  style_mixing_prob=0.0, noise_mode="const")
    D = Discriminator(resolution=16, channels=1, num_classes=3, channel_base=256, channel_max=16)
    adam = partial(torch.optim.Adam, lr=2e-3, betas=(0.0, 0.99))
    gan = GAN(G=G, D=D, g_opt=adam, d_opt=adam, objective=Objective(loss="logistic", reuse_fakes=reuse_fakes),
              ema=EMAHalfLife(), kimg=1000.0)
    gan.configure_optimizers()
    gan.log = gan.log_dict = lambda *a, **k: None  # the Lightning plumbing that training_step touches, minus the Trainer
    forwards = []
    G.register_forward_hook(lambda *a: forwards.append(1))
    batch = (torch.rand(8, 1, 16, 16) * 2 - 1, torch.randint(0, 3, (8,)))
    if same_latents:  # the reference: a fresh G forward in the G step, of the D step's latents
        first = gan._latents(8)
        gan._latents = lambda n: first
    gan.training_step(batch, 0)
    return {k: v.detach().clone() for k, v in G.named_parameters()}, len(forwards)


def test_reused_fakes_give_the_update_of_a_fresh_forward_of_the_same_latents():
    reused, n_reused = _one_step(reuse_fakes=True, same_latents=False)
    fresh, n_fresh = _one_step(reuse_fakes=False, same_latents=True)
    assert (n_reused, n_fresh) == (1, 2)  # one G forward saved per G step
    for name in fresh:  # same images, same D -> same gradients (up to the order of float sums)
        torch.testing.assert_close(reused[name], fresh[name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_reuse_the_g_step_draws_new_latents():
    independent, _ = _one_step(reuse_fakes=False, same_latents=False)
    fresh, _ = _one_step(reuse_fakes=False, same_latents=True)
    assert any(not torch.allclose(independent[k], fresh[k]) for k in fresh)
