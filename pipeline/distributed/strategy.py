"""Lightning strategy for GANs under torchrun: DDP process group and samplers, no model wrapper."""
from __future__ import annotations

import os

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from pipeline.distributed.sync import broadcast_module


class GANDDPStrategy(DDPStrategy):
    """DDPStrategy that leaves the LightningModule unwrapped, and that survives torchrun's restarts.

    Lightning's DDP wrapper assumes one forward and one backward per step, and plain `strategy="ddp"`
    fails for a manual-optimization GAN with unused parameters. The GAN module averages gradients
    itself (see `pipeline.distributed.sync`), so here we only start the process group and make every
    rank begin from rank 0's weights.
    """

    def setup_distributed(self) -> None:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's workers share the agent's TCPStore, and it outlives a restart (`--max-restarts`): the
            # restarted workers would read the gloo/NCCL addresses the dead ones published there and fail to
            # connect (seen with torch 2.13). A key prefix per restart keeps the rounds apart; Lightning's own
            # setup then finds the group initialised. Every agent counts the restart under the static
            # rendezvous; under c10d a membership change restarts workers without counting (see README).
            self.set_world_ranks()
            env = self.cluster_environment
            assert env is not None
            client = dist.TCPStore(env.main_address, env.main_port, env.world_size(), is_master=False,
                                   timeout=self._timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(self._get_process_group_backend(), store=dist.PrefixStore(
                f"gan-pipeline/attempt-{attempt}", client), rank=env.global_rank(), world_size=env.world_size(),
                timeout=self._timeout)
        super().setup_distributed()

    def configure_ddp(self) -> None:
        assert self.model is not None
        broadcast_module(self.model)
