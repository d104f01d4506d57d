"""One rank of the engine resume tests: train, checkpoint, train on; then a fresh GAN resumes from the checkpoint.

argv: OUT_DIR STRATEGY(ddp|deepspeed) ZERO_STAGE PRECISION(fp32|fp16|bf16). Writes rank{r}.pt with the weights
of the straight run and of the resumed one, and the engines' stats. Runs under torchrun or as one process.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.distributed.backend import DDPBackend, DeepSpeedBackend
from pipeline.distributed.precision import Precision
from tests.distributed.engine_case import checkpoint, restore, tiny_gan, train, weights

out, strategy, stage, mode = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
if "RANK" in __import__("os").environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
backend = DeepSpeedBackend(zero_stage=stage) if strategy == "deepspeed" else DDPBackend()
precision = Precision(mode=mode)

straight = tiny_gan(backend, precision)
initial = weights(straight)
train(straight, range(0, 3), rank)
ckpt = checkpoint(straight)  # every rank takes part (ZeRO partitions, RNG states)
if rank == 0:
    torch.save(ckpt, out / "mid.ckpt")
if dist.is_initialized():
    dist.barrier()
train(straight, range(3, 6), rank)

resumed = tiny_gan(backend, precision, seed=1, build_engines=False)  # other initial weights: all must come from the file
restore(resumed, torch.load(out / "mid.ckpt", weights_only=True))
train(resumed, range(3, 6), rank)
torch.save({"initial": initial, "straight": weights(straight), "resumed": weights(resumed),
            "stats": {n: e.stats() for n, e in straight.engines.items()},
            "counters": (resumed.d_step, resumed.g_step, resumed.images_seen)}, out / f"rank{rank}.pt")
