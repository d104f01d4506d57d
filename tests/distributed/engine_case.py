"""A tiny conditional StyleGAN2 GAN driven step by step without a Trainer, for the engine and precision tests.

R1 and path length run every other step, so that every step exercises one of them under loss scaling.
Batches are a function of (rank, step) only, so a resumed run can be fed exactly what the original saw.
"""
from __future__ import annotations

from functools import partial

import torch

from pipeline.distributed.backend import DDPBackend, DeepSpeedBackend
from pipeline.distributed.precision import Precision
from pipeline.gan_module import GAN
from pipeline.models.stylegan2.discriminator import Discriminator
from pipeline.models.stylegan2.generator import Generator
from pipeline.training.ema import EMAHalfLife
from pipeline.training.objective import Objective

BATCH, RES, CLASSES = 8, 16, 3


def tiny_gan(backend: DDPBackend | DeepSpeedBackend = DDPBackend(), precision: Precision = Precision(), *,
             seed: int = 0, r1_gamma: float = 0.5, pl_weight: float = 2.0, build_engines: bool = True,
             device: str = "cpu") -> GAN:
    """build_engines=False: as Lightning leaves it before a resume (engines come from `restore`)."""
    torch.manual_seed(seed)
    G = Generator(resolution=RES, channels=1, num_classes=CLASSES, z_dim=16, w_dim=16, channel_base=256,
                  channel_max=16, mapping_layers=2)
    D = Discriminator(resolution=RES, channels=1, num_classes=CLASSES, channel_base=256, channel_max=16)
    adam = partial(torch.optim.Adam, lr=2e-3, betas=(0.0, 0.99), eps=1e-8)
    objective = Objective(loss="logistic", r1_gamma=r1_gamma, r1_interval=2, pl_weight=pl_weight, pl_interval=2)
    gan = GAN(G=G, D=D, g_opt=adam, d_opt=adam, objective=objective, ema=EMAHalfLife(half_life_kimg=0.01),
              kimg=1000.0, backend=backend, precision=precision, seed=seed)
    gan.log = gan.log_dict = lambda *a, **k: None  # the Lightning plumbing training_step touches, minus the Trainer
    gan.to(device)
    if build_engines:
        gan.configure_optimizers()
    return gan


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.rand(BATCH, 1, RES, RES, generator=gen) * 2 - 1, torch.randint(0, CLASSES, (BATCH,), generator=gen)


def train(gan: GAN, steps: range, rank: int = 0) -> None:
    for step in steps:
        x, y = batch(rank, step)
        gan.training_step((x.to(gan.device), y.to(gan.device)), step)


def weights(gan: GAN) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of G, D and G_ema, in fp32."""
    return {f"{net}.{k}": v.detach().float().clone()
            for net in ("G", "D", "G_ema") for k, v in getattr(gan, net).state_dict().items()}


def checkpoint(gan: GAN) -> dict:
    """What Lightning writes: the module's state dict plus on_save_checkpoint's entries (a collective)."""
    ckpt = {"state_dict": gan.state_dict()}
    gan.on_save_checkpoint(ckpt)
    return ckpt


def restore(gan: GAN, ckpt: dict) -> None:
    """Lightning's order: on_load_checkpoint, the module's weights, then configure_optimizers."""
    gan.on_load_checkpoint(ckpt)
    gan.load_state_dict(ckpt["state_dict"])
    gan.configure_optimizers()
