"""What the launcher (torchrun, or a Kubernetes operator through it) tells this process about the world."""
from __future__ import annotations

import os


def launch_world() -> tuple[int, int, int]:
    """(world size, global rank, processes on this node) from torchrun's environment; (1, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world, rank, local_world
