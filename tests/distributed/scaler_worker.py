"""One rank of the 2-process fp16 test: an inf in D's gradients on rank 1 only, in the second step.

Gradients are all-reduced before they are unscaled, so the inf reaches rank 0 too: both ranks skip D's step
and halve D's scale, and G steps on both. Writes rank{r}.pt with the weights and both engines' stats.
"""
import math
import sys

import torch
import torch.distributed as dist

from pipeline.distributed.precision import Precision
from tests.distributed.engine_case import tiny_gan, train, weights

dist.init_process_group("gloo")
rank = dist.get_rank()
gan = tiny_gan(precision=Precision(mode="fp16", init_scale=2.0**10), r1_gamma=0.0, pl_weight=0.0)
train(gan, range(0, 1), rank)
d_before = weights(gan)
if rank == 1:
    handle = next(gan.D.parameters()).register_hook(lambda g: torch.full_like(g, math.inf))
train(gan, range(1, 2), rank)
if rank == 1:
    handle.remove()
after_skip = weights(gan)
train(gan, range(2, 3), rank)
torch.save({"before": d_before, "after_skip": after_skip, "end": weights(gan),
            "stats": {n: e.stats() for n, e in gan.engines.items()}}, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
