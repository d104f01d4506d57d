"""Training throughput of an experiment: prints one JSON line.

    python bench/train_throughput.py --steps 20 experiment=biggan_cifar32 [more Hydra overrides]
    python bench/train_throughput.py --steps 50 experiment=stylegan2_cifar32 precision=fp16 strategy=deepspeed

With precision=fp16 it also reports each network's final loss scale and skipped steps (see bench/precision_gpu.sh
for the CUDA comparison of the DDP and DeepSpeed fp16 paths).

Runs `--warmup` + `--steps` D steps of the real training loop (gan-train's `run`, W&B off) and reports
real images shown to D per second, seconds per D step (a G step is included every `d_steps`), peak RSS,
parameter counts, and this machine's fp32 GEMM speed at the time (throughput scales with it). Metrics
are off (`metrics=none`) unless an override names them. Data is the configured dataset (the embedded digits unless overridden).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.train as train  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of the D steps after the warm-up ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.images0, self.images1, self.steps = warmup, 0.0, 0.0, 0, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # kernels run asynchronously: time what has finished
        self.steps += 1
        if self.steps == self.warmup:
            self.t0, self.images0 = time.perf_counter(), pl_module.images_seen
        self.t1, self.images1 = time.perf_counter(), pl_module.images_seen


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """fp32 matmul speed of this machine right now, so that figures from different days compare."""
    a = torch.randn(n, n)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def adam_moments_mb(engine) -> float:
    """Optimizer state held by this rank (Adam's moments): whole under DDP, this rank's partition under ZeRO."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's ZeRO wraps the torch optimizer
    tensors = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed D steps")
    parser.add_argument("--warmup", type=int, default=4, help="untimed D steps first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=biggan_cifar32")
    args = parser.parse_args()

    gemm = gemm_gflops()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        probe = compose(config_name="train", overrides=args.overrides)
        batch = probe.data.batch_size
        kimg = (args.warmup + args.steps) * batch / 1000
        with tempfile.TemporaryDirectory() as out:
            # Metrics are off unless asked for: their evaluations are not training throughput.
            metrics = [] if any(o.split("=")[0].lstrip("+~") == "metrics" for o in args.overrides) else ["metrics=none"]
            cfg = compose(config_name="train", overrides=[
                *metrics, *args.overrides, f"train.kimg={kimg}", "~logger", f"paths.output_dir={out}", "run.name=bench",
                f"train.sample_every_kimg={kimg * 10}", f"train.ckpt_every_kimg={kimg * 10}"])
            timer = StepTimer(args.warmup)
            _, gan = train.run(cfg, callbacks=[timer])
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # under torchrun: one line, from rank 0 (images/s counts every rank's images)
    seconds = timer.t1 - timer.t0
    steps = timer.steps - timer.warmup
    print(json.dumps({
        "bench": "train_throughput",
        "overrides": args.overrides,
        "model": cfg.model.name,
        "batch_per_device": batch,
        "d_steps_per_g_step": cfg.model.objective.d_steps,
        "timed_d_steps": steps,
        "real_images_per_s": round((timer.images1 - timer.images0) / seconds, 2),
        "seconds_per_d_step": round(seconds / steps, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params_G": sum(p.numel() for p in gan.G.parameters()),
        "params_D": sum(p.numel() for p in gan.D.parameters()),
        "strategy": cfg.strategy._target_.rsplit(".", 1)[-1], "precision": cfg.precision.mode,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "engines": {name: {**engine.stats(), "adam_moments_mb_per_rank": round(adam_moments_mb(engine), 3)}
                    for name, engine in gan.engines.items()},  # loss scale and skipped steps under fp16
        "device": torch.cuda.get_device_name(gan.device) if gan.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "fp32_gemm_gflops": round(gemm, 1),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
