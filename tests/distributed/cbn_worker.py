"""One rank of test_per_class_statistics_across_ranks: half of a batch through a per-class cBN layer."""
import sys

import torch
import torch.distributed as dist

from tests.distributed.cbn_case import batch, layer, loss_weights

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x, y = batch()
n = len(y) // world
sl = slice(rank * n, (rank + 1) * n)
bn = layer()
xs = x[sl].clone().requires_grad_(True)
out = bn(xs, None, y[sl])
# The loss of the whole batch is the sum of the ranks' losses; the all-reduce's backward carries the other
# ranks' share of the statistics' gradient to this rank's samples.
(out * loss_weights()[sl]).sum().backward()
grads = {name: p.grad.clone() for name, p in bn.named_parameters()}
for g in grads.values():
    dist.all_reduce(g)
torch.save({"out": out.detach(), "dx": xs.grad, "grads": grads,
            "buffers": {k: v.clone() for k, v in bn.named_buffers()}}, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
