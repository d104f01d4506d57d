"""Lightning strategy for GANs under torchrun: DDP process group and samplers, no model wrapper."""
from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from pipeline.distributed.sync import broadcast_module


class GANDDPStrategy(DDPStrategy):
    """DDPStrategy that leaves the LightningModule unwrapped.

    Lightning's DDP wrapper assumes one forward and one backward per step, and plain `strategy="ddp"`
    fails for a manual-optimization GAN with unused parameters. The GAN module averages gradients
    itself (see `pipeline.distributed.sync`), so here we only start the process group and make every
    rank begin from rank 0's weights.
    """

    def configure_ddp(self) -> None:
        assert self.model is not None
        broadcast_module(self.model)
