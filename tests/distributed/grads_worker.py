"""One rank of the gradient all-reduce test: parameters used on both ranks, on one rank, and on none.

Writes rank{r}.pt with each parameter's gradient after all_reduce_grads (None stays None).
"""
import sys

import torch
import torch.distributed as dist

from pipeline.distributed.sync import all_reduce_grads

dist.init_process_group("gloo")
rank = dist.get_rank()
both, one, none = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
loss = (both * (rank + 1)).sum() + ((one * 4).sum() if rank == 0 else 0)  # `none`: a layer not grown yet
loss.backward()
all_reduce_grads([both, one, none])
torch.save({"both": both.grad, "one": one.grad, "none": none.grad}, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
