"""Progressive growing (Karras et al. 2018, PGGAN sec. 3): which resolution the GAN trains at, and the fade-in alpha.

Training starts at `resolutions[0]`. Stage i > 0 starts after the first i stages' `stage_kimg` and fades its
new layers in: alpha = (kimg - start_i) / fade_kimg, clipped to [0, 1]. The last stage runs until the end of
the run. Everything is a function of the images shown so far, so a resumed run continues on the same
schedule without any state of its own. `schedule=fixed` is one stage at the data's resolution.

Per-stage batch sizes change how many images a batch holds, so the stage of a *batch* (which the data stream
needs before the step) is planned here too: batch g belongs to the stage in which the images before it fall.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """Where the schedule is: stage index, resolution, and the weight alpha of the newest layers."""

    index: int
    resolution: int
    alpha: float


@dataclass(frozen=True)
class BatchPlan:
    """Stage `stage` begins at global batch `first_batch`, after `first_images` images; `batch_size` per rank."""

    stage: int
    first_batch: int
    first_images: int
    batch_size: int


@dataclass(frozen=True)
class GrowthSchedule:
    """`schedule.*`: resolutions, the images per stage and per fade, optional per-stage batch sizes and lrs."""

    resolutions: list[int]
    stage_kimg: float | list[float] = 0.0  # one value for every stage but the last, or one per stage but the last
    fade_kimg: float = 0.0  # fade-in length at the start of every stage after the first (0: switch at once)
    batch_size: list[int] | None = None  # per rank, one per stage; None = data.batch_size throughout
    g_lr: list[float] | None = None  # one per stage, replacing model.g_opt.lr; None = model.g_opt.lr throughout
    d_lr: list[float] | None = None
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)  # images before each stage

    def __post_init__(self) -> None:
        res = [int(r) for r in self.resolutions]
        if not res:
            raise ValueError("schedule.resolutions is empty: give at least the data's resolution")
        if any(r < 4 or r & (r - 1) for r in res) or any(b != 2 * a for a, b in zip(res, res[1:])):
            raise ValueError(f"schedule.resolutions={res} must be powers of 2 that double at every stage, "
                             "e.g. [8, 16, 32]")
        n = len(res)
        stage = self.stage_kimg
        lengths = [float(stage)] * (n - 1) if isinstance(stage, (int, float)) else [float(s) for s in stage]
        if len(lengths) != n - 1:
            raise ValueError(f"schedule.stage_kimg has {len(lengths)} values for {n} resolutions: give one number, "
                             f"or {n - 1} (the last stage runs until train.kimg)")
        if n > 1 and not all(s > 0 for s in lengths):
            raise ValueError(f"schedule.stage_kimg={stage} must be > 0")
        if not 0 <= self.fade_kimg <= min(lengths[1:], default=math.inf):
            raise ValueError(f"schedule.fade_kimg={self.fade_kimg} must lie in [0, stage_kimg] (the fade is the "
                             "start of its stage; a later stage begins after it)")
        for key, values in (("batch_size", self.batch_size), ("g_lr", self.g_lr), ("d_lr", self.d_lr)):
            if values is None:
                continue
            if len(values) != n:
                raise ValueError(f"schedule.{key} has {len(values)} values for {n} resolutions: give one per stage "
                                 f"({n}) or null")
            if not all(v > 0 for v in values):
                raise ValueError(f"schedule.{key}={list(values)} must be > 0")
        object.__setattr__(self, "resolutions", res)
        starts = [0.0]
        for length in lengths:
            starts.append(starts[-1] + length)
        object.__setattr__(self, "_starts", tuple(round(s * 1000) for s in starts))  # images: exact comparisons

    # ---- where the schedule is -------------------------------------------------------------------
    @property
    def progressive(self) -> bool:
        return len(self.resolutions) > 1

    @property
    def final_resolution(self) -> int:
        return self.resolutions[-1]

    @property
    def stage_starts_kimg(self) -> tuple[float, ...]:
        """kimg at which each stage begins (stage 0 at 0)."""
        return tuple(s / 1000.0 for s in self._starts)

    def at(self, images_seen: int) -> Stage:
        """The stage, resolution and alpha for the step taken after `images_seen` images."""
        i = max(i for i, start in enumerate(self._starts) if images_seen >= start)
        if i == 0 or self.fade_kimg == 0:
            alpha = 1.0
        else:
            alpha = min(1.0, (images_seen - self._starts[i]) / (self.fade_kimg * 1000.0))
        return Stage(index=i, resolution=self.resolutions[i], alpha=alpha)

    def lr(self, net: str, stage: int) -> float | None:
        """Stage `stage`'s lr for net "G" or "D", or None to keep the optimizer's own."""
        values = self.g_lr if net == "G" else self.d_lr
        return None if values is None else float(values[stage])

    # ---- batches ---------------------------------------------------------------------------------
    def batch_plan(self, batch_size: int, world: int) -> list[BatchPlan]:
        """The first global batch of every stage, for `batch_size` per rank (or the per-stage ones) on `world` ranks."""
        sizes = self.batch_size or [batch_size] * len(self.resolutions)
        plan = [BatchPlan(stage=0, first_batch=0, first_images=0, batch_size=int(sizes[0]))]
        for i, start in enumerate(self._starts[1:], start=1):
            prev = plan[-1]
            per_batch = prev.batch_size * world
            # The first batch whose images-before reach the stage's start.
            batches = max(0, math.ceil((start - prev.first_images) / per_batch))
            plan.append(BatchPlan(stage=i, first_batch=prev.first_batch + batches,
                                  first_images=prev.first_images + batches * per_batch, batch_size=int(sizes[i])))
        return plan

    def num_batches(self, total_images: int, batch_size: int, world: int) -> int:
        """Global batches until `total_images` images have been shown."""
        plan = [p for p in self.batch_plan(batch_size, world) if p.first_images < total_images] or \
            self.batch_plan(batch_size, world)[:1]
        last = plan[-1]
        return last.first_batch + math.ceil((total_images - last.first_images) / (last.batch_size * world))


def batch_size_at(plan: list[tuple[int, int]], batch: int) -> int:
    """Per-rank size of global batch `batch` under a plan of (first_batch, batch_size) pairs (sorted)."""
    size = plan[0][1]
    for first, s in plan:
        if batch < first:
            break
        size = s
    return size
