"""The torchrun command line of one node of a gan-train job: what a cluster runs on every node, and what
`gan-launch local` runs once per simulated node.

The node rank and the master come from the launcher (an Indexed Job's completion index, a PyTorchJob's
environment, or `gan-launch local`); the user's Hydra overrides are passed through verbatim, as separate
arguments, so values with spaces or quotes need no shell quoting.
"""
from __future__ import annotations

import sys


def override_keys(overrides: list[str]) -> set[str]:
    """The keys that Hydra overrides set (`key=value`, `+key=value`, `++key=value`, `~key`)."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key:
            keys.add(key)
    return keys


def check_overrides(overrides: list[str]) -> None:
    """What every multi-process run needs, checked before any process starts."""
    keys = override_keys(overrides)
    if "run.name" not in keys:
        raise ValueError("give run.name=<name>: every rank, and every restart, must find the same run directory")
    for key in ("trainer.num_nodes", "trainer.devices"):
        if key in keys:
            raise ValueError(f"leave out {key}=...: the launcher sets it from --nodes and --nproc-per-node")


def torchrun_command(*, nnodes: int, node_rank: int, nproc_per_node: int, master_addr: str, master_port: int,
                     max_restarts: int, overrides: list[str], python: str = sys.executable) -> list[str]:
    """argv of one node's torchrun agent running gan-train; resume=auto unless the overrides say otherwise,
    so that a restarted worker (or a rescheduled pod) continues from the last checkpoint."""
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node rank {node_rank} is outside 0..{nnodes - 1}")
    resume = [] if "resume" in override_keys(overrides) else ["resume=auto"]
    return [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc_per_node), "--master-addr", master_addr, "--master-port", str(master_port),
            "--max-restarts", str(max_restarts),
            "-m", "pipeline.train", f"trainer.num_nodes={nnodes}", f"trainer.devices={nproc_per_node}",
            *resume, *overrides]
