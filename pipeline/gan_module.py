"""The GAN as a LightningModule: G, D, G_ema, two optimizers, and a training step that reads like the algorithm.

One training step consumes one real batch and makes one D step; every `objective.d_steps` D steps it
also makes one G step (BigGAN-PyTorch's schedule). Everything between a loss and updated weights (autocast,
the per-network loss scaler, backward, the gradient all-reduce, clipping, the optimizer) belongs to each
network's engine from `pipeline.distributed` (`strategy=ddp|deepspeed`, `precision=fp32|fp16|bf16`).
"""
from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.data.diffaugment import DiffAugment
from pipeline.distributed.backend import DDPBackend, DeepSpeedBackend
from pipeline.distributed.engine import NetEngine
from pipeline.distributed.precision import Precision
from pipeline.distributed.sync import all_reduce_mean_, sync_buffers, world_size
from pipeline.losses.adversarial import get_loss
from pipeline.losses.regularizers import orthogonal_penalty, path_length_penalty, r1_penalty
from pipeline.training.ema import EMAHalfLife, EMASchedule, update_ema
from pipeline.training.objective import Objective
from pipeline.training.progressive import GrowthSchedule, Stage
from pipeline.training.sampling import FakeLabels

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class GAN(L.LightningModule):
    """Conditional GAN with the `G(z, y) -> images`, `D(x, y) -> logits (N,)` contract."""

    def __init__(self, *, G: nn.Module, D: nn.Module, g_opt: OptimizerFactory, d_opt: OptimizerFactory,
                 objective: Objective, ema: EMASchedule | EMAHalfLife, kimg: float,
                 class_probs: list[float] | None = None, fake_labels: FakeLabels = FakeLabels(), seed: int = 0,
                 backend: DDPBackend | DeepSpeedBackend = DDPBackend(), precision: Precision = Precision(),
                 schedule: GrowthSchedule | None = None, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 config: dict | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False  # two optimizers, D steps per G step: we drive them ourselves
        self.G, self.D = G, D
        self.G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        self.g_opt_factory, self.d_opt_factory = g_opt, d_opt
        self.objective, self.ema = objective, ema
        self.backend, self.precision = backend, precision
        self.engines: dict[str, NetEngine] = {}  # "G", "D": built in configure_optimizers
        self._engine_state: dict[str, Any] | None = None  # from a checkpoint, loaded once the engines exist
        self._rng_state: list[dict[str, Any]] | None = None  # likewise
        if objective.pl.enabled and not hasattr(G, "mapping"):
            raise ValueError("pl_weight > 0 needs a generator that exposes its w (G.mapping, e.g. StyleGAN2); "
                             "set model.objective.pl_weight=0")
        self.register_buffer("pl_mean", torch.zeros(()))  # running mean of path lengths (checkpointed)
        self.d_loss_fn, self.g_loss_fn = get_loss(objective.loss)
        self.total_images = int(round(kimg * 1000))
        probs = torch.tensor(class_probs, dtype=torch.float) if class_probs else torch.empty(0)
        self.register_buffer("class_probs", probs, persistent=False)
        self.fake_labels, self.seed = fake_labels, seed  # seed: equal on every rank (grouped labels agree)
        # T in D(T(x)) for every image D judges in a training step, reals and fakes alike (DiffAugment, Zhao et al.
        # 2020, fig. 4). None: the identity. DiffAugment draws from the checkpointed CPU RNG: resume stays exact.
        self.augment = augment if augment is not None else DiffAugment()
        self.config = config or {}  # resolved config, stored in every checkpoint
        # Counters; all are checkpointed (on_save_checkpoint) so a resumed run continues exactly here.
        self.images_seen = 0  # real images shown to D, all ranks together
        self.d_step = 0
        self.g_step = 0
        self.label_draws = 0  # batches of fake labels drawn: with the seed, the key of the next grouped draw
        # Progressive growing: the stage is a function of images_seen, applied to G, D and G_ema before every step.
        self.schedule = schedule or GrowthSchedule(resolutions=[G.resolution])
        self._relative_lr: dict[str, list[float]] = {}  # per param group: its lr / the configured lr
        for name, factory in (("G", g_opt), ("D", d_opt)):
            if self.schedule.lr(name, 0) is not None and not getattr(factory, "keywords", {}).get("lr"):
                key = "g_opt" if name == "G" else "d_opt"
                raise ValueError(f"schedule.{name.lower()}_lr needs model.{key}.lr set in the optimizer config")
        self.stage = self._grow()

    # ---- Lightning plumbing -------------------------------------------------------------------
    def configure_optimizers(self) -> None:
        """Build G's and D's engines. Their optimizers stay out of Lightning: the engines checkpoint them."""
        device = self.device.type
        self.engines = {
            "G": self.backend.engine("G", self.G, _make_optimizer(self.g_opt_factory, self.G, self.objective.pl),
                                     self.precision, device),
            "D": self.backend.engine("D", self.D, _make_optimizer(self.d_opt_factory, self.D, self.objective.r1),
                                     self.precision, device)}
        for name, factory in (("G", self.g_opt_factory), ("D", self.d_opt_factory)):
            if self.schedule.lr(name, 0) is not None:
                self._relative_lr[name] = self._lr_factors(name, factory)
        for name, state in (self._engine_state or {}).items():
            self.engines[name].load_state_dict(state)
        self._engine_state = None
        if self._rng_state is not None:  # after the engines: building them may draw random numbers
            _restore_rng_state(self._rng_state)
            self._rng_state = None

    def _lr_factors(self, name: str, factory: OptimizerFactory) -> list[float]:
        """Each param group's lr relative to the configured one: a stage's lr keeps the lazy-regularization factor.

        Read before a checkpoint's optimizer state is loaded (that holds the previous stage's lrs)."""
        configured = factory.keywords["lr"]  # checked in __init__
        return [group["lr"] / configured for group in self.engines[name].optimizer.param_groups]

    def _grow(self) -> Stage:
        """Set the stage of the step about to be taken: resolution and alpha of G, D, G_ema, and the stage's lrs."""
        stage = self.schedule.at(self.images_seen)
        if self.schedule.progressive:
            self.G.set_growth(stage.resolution, stage.alpha)
            self.D.set_growth(stage.resolution, stage.alpha)
            # Samples and metrics compare G_ema at the final size, whatever the stage.
            self.G_ema.set_growth(stage.resolution, stage.alpha, output_resolution=self.schedule.final_resolution)
        for name, factors in self._relative_lr.items():  # the groups themselves: loading a state replaces them
            for group, factor in zip(self.engines[name].optimizer.param_groups, factors, strict=True):
                group["lr"] = self.schedule.lr(name, stage.index) * factor
        return stage

    def _latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.G.z_dim, device=self.device)
        rank = dist.get_rank() if world_size() > 1 else 0
        y = self.fake_labels.draw(n, self.class_probs, rank=rank, world=world_size(), device=self.device,
                                  seed=self.seed, index=self.label_draws)
        self.label_draws += 1
        return z, y

    def _count_optimizer_step(self) -> None:
        """Lightning's global_step (which checkpoints, logging intervals and max_steps follow) counts the steps of
        its optimizer wrappers, and the engines step outside them: count each G and D step as they would."""
        if self._trainer is not None:
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()

    # ---- the algorithm ------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x_real, y_real = batch[0], batch[1]  # (B, C, H, W) in [-1, 1], (B,); then the data's health record
        self.stage = self._grow()
        if x_real.shape[-1] != self.stage.resolution:  # reals at the stage's size, with D's anti-aliasing filter
            x_real = self.D.resize(x_real, self.stage.resolution)
        g, d = self.engines["G"], self.engines["D"]
        B = x_real.shape[0]
        obj = self.objective

        # D step: real vs. fake (two D passes: minibatch-stddev must not mix real and fake samples).
        g_step_due = (self.d_step + 1) % obj.d_steps == 0
        keep_graph = obj.reuse_fakes and g_step_due  # the G step will backpropagate through these fakes
        z, y_fake = self._latents(B)
        with torch.set_grad_enabled(keep_graph), g.autocast():
            x_fake_g = self.G(z, y_fake)
        x_fake = x_fake_g.detach()
        r1_due = obj.r1.due(self.d_step)
        x_real = x_real.detach().requires_grad_(r1_due)
        with d.autocast():  # losses are taken in fp32 whatever precision D ran in
            # Each batch gets its own draw of T; R1 below differentiates through T back to the un-augmented x_real.
            d_real, d_fake = self.D(self.augment(x_real), y_real).float(), self.D(self.augment(x_fake), y_fake).float()
        loss_d = self.d_loss_fn(d_real, d_fake)
        total_d = loss_d
        if r1_due:  # lazy R1: every r1_interval steps, gamma/2 * interval * E||grad_x D(x)||^2
            r1 = r1_penalty(d_real, x_real, grad_scale=d.grad_scale)
            total_d = total_d + obj.r1.scale * r1
            self.log("reg/r1", r1.detach(), on_step=True)
        if obj.d_ortho > 0:
            ortho_d = orthogonal_penalty(self.D, variant=obj.ortho_variant)
            total_d = total_d + obj.d_ortho * ortho_d
            self.log("reg/ortho_D", ortho_d.detach(), on_step=True)
        d.step(total_d)  # a step skipped for an fp16 overflow still counts: the schedule moves on
        self._count_optimizer_step()
        self.d_step += 1
        self.images_seen += B * world_size()
        self.log_dict({"loss/D": loss_d.detach(), "D/real": d_real.detach().mean(),
                       "D/fake": d_fake.detach().mean()}, on_step=True, prog_bar=False)

        # G step every `d_steps` D steps; D is frozen so no D gradients are computed (or synchronised).
        if g_step_due:
            self.D.requires_grad_(False)
            if keep_graph:  # same G as in the D step, so the same images: no second G forward
                x_g, y = x_fake_g, y_fake
            else:
                z, y = self._latents(B)
                with g.autocast():
                    x_g = self.G(z, y)
            with d.autocast():
                logits = self.D(self.augment(x_g), y).float()  # the same T as in D's step: G learns through it
            loss_g = self.g_loss_fn(logits)
            total_g = loss_g
            if obj.pl.due(self.g_step):  # lazy path length on a smaller batch (StyleGAN2 sec. 3.2, appendix B)
                n = max(1, B // obj.pl_batch_shrink)
                z, y = self._latents(n)
                with g.autocast():
                    images, ws = self.G(z, y, return_ws=True)
                pl, new_mean, lengths = path_length_penalty(images, ws, self.pl_mean, decay=obj.pl_decay,
                                                            grad_scale=g.grad_scale)
                self.pl_mean.copy_(all_reduce_mean_(new_mean))
                total_g = total_g + obj.pl.scale * pl
                self.log_dict({"reg/path_length": lengths.mean(), "reg/pl_penalty": pl.detach()}, on_step=True)
            if obj.g_ortho > 0:
                ortho_g = orthogonal_penalty(self.G, variant=obj.ortho_variant)
                total_g = total_g + obj.g_ortho * ortho_g
                self.log("reg/ortho_G", ortho_g.detach(), on_step=True)
            g.step(total_g)
            self._count_optimizer_step()
            self.D.requires_grad_(True)
            sync_buffers(self.G)  # BatchNorm statistics (and w_avg) saw different data on each rank
            decay = self.ema.decay_for(g_step=self.g_step, batch_size=B * world_size(), images_seen=self.images_seen)
            update_ema(self.G_ema, self.G, decay)
            self.g_step += 1
            self.log("loss/G", loss_g.detach(), on_step=True, prog_bar=True)

        if self.schedule.progressive:
            self.log_dict({"progress/stage": float(self.stage.index), "progress/alpha": self.stage.alpha,
                           "progress/resolution": float(self.stage.resolution)}, on_step=True, prog_bar=False)
        self.log_dict({"progress/kimg": self.images_seen / 1000.0,
                       "lr/G": float(g.optimizer.param_groups[0]["lr"]),
                       "lr/D": float(d.optimizer.param_groups[0]["lr"]),
                       **{f"precision/{k}_{name}": v for name, e in self.engines.items() for k, v in e.stats().items()}},
                      on_step=True, prog_bar=False)
        self.log("kimg", self.images_seen / 1000.0, on_step=True, prog_bar=True, logger=False)
        if self.images_seen >= self.total_images:
            self.trainer.should_stop = True

    # ---- checkpoint contents ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs on every rank. G's BatchNorm statistics move in D steps too: make them agree before saving.
        sync_buffers(self.G)
        checkpoint["config"] = self.config
        checkpoint["counters"] = {"images_seen": self.images_seen, "d_step": self.d_step, "g_step": self.g_step,
                                  "label_draws": self.label_draws}
        checkpoint["rng"] = _gather_rng_states()
        checkpoint["engines"] = {name: engine.state_dict() for name, engine in self.engines.items()}
        # Where the next step trains (recomputed from images_seen on resume; recorded for gan-eval and readers).
        stage = self.schedule.at(self.images_seen)
        checkpoint["growth"] = {"stage": stage.index, "resolution": stage.resolution, "alpha": stage.alpha,
                                "final_resolution": self.schedule.final_resolution}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint["counters"]
        self.images_seen, self.d_step, self.g_step = (counters["images_seen"], counters["d_step"],
                                                      counters["g_step"])
        self.label_draws = counters.get("label_draws", 0)
        self.stage = self._grow()  # G_ema samples at the resumed stage before the first step
        # Optimizers, loss scalers and RNG states wait for configure_optimizers: Lightning restores the modules
        # before it builds the optimizers, and the engines do not exist yet. Checkpoints from before the engines kept the two optimizers in Lightning's list.
        self._engine_state = checkpoint.get("engines") or {
            name: {"optimizer": state} for name, state in zip(("G", "D"), checkpoint.get("optimizer_states", []))}
        self._rng_state = checkpoint.get("rng")


def _make_optimizer(factory: OptimizerFactory, net: nn.Module, lazy: Any) -> torch.optim.Optimizer:
    """Build an optimizer; under lazy regularization Adam's lr and betas are scaled by k/(k+1) (StyleGAN2 app. B)."""
    keywords = getattr(factory, "keywords", {})
    if lazy.enabled and "lr" in keywords and "betas" in keywords:
        lr, betas = lazy.adjust_adam(keywords["lr"], tuple(keywords["betas"]))
        return factory(net.parameters(), lr=lr, betas=betas)
    return factory(net.parameters())


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # latents and noise drawn on the GPU
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank samples its own latents), for rank 0 to write."""
    state = _rng_state()
    if world_size() == 1:
        return [state]
    states: list[Any] = [None] * world_size()
    dist.all_gather_object(states, state)
    return states


def _restore_rng_state(states: list[dict[str, Any]] | None) -> None:
    if not states:
        return
    rank = dist.get_rank() if world_size() > 1 else 0
    if len(states) != world_size():
        return  # a different world size: keep the fresh per-rank seeds set at start-up
    s = states[rank]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
