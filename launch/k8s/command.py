"""What runs in a pod: the container's argv and the environment that places it in the job.

One node's process is `k8s/entrypoint.sh <gan-train overrides>`: the script reads the node's place (nodes,
processes per node, node rank, master) from environment variables and starts torchrun with the static
rendezvous (see README "Faults and resume"), so the same argv and `pod_env(i)` run pod i on any machine.
"""
from __future__ import annotations

from launch.torchrun import override_keys

ENTRYPOINT = "/app/k8s/entrypoint.sh"  # where k8s/Dockerfile puts the repository
# Set by the launcher from its options; the same keys in the user's overrides would contradict them.
LAUNCHER_KEYS = {"run.name": "--name", "paths.output_dir": "launch.mount_path",
                 "trainer.num_nodes": "--nodes", "trainer.devices": "--gpus-per-node"}


def check_user_overrides(overrides: list[str]) -> None:
    for key in sorted(override_keys(overrides) & LAUNCHER_KEYS.keys()):
        raise ValueError(f"leave out {key}=...: gan-launch k8s sets it (from {LAUNCHER_KEYS[key]}) so that every "
                         "pod, and every restarted pod, finds the same run directory")


def container_command(*, nodes: int, gpus_per_node: int, name: str, runs_dir: str, overrides: list[str],
                      entrypoint: str = ENTRYPOINT) -> list[str]:
    """argv of every node's container: the run directory is <runs_dir>/<name> on the shared volume; resume=auto
    unless the overrides set resume, so a rescheduled pod continues from the last checkpoint."""
    resume = [] if "resume" in override_keys(overrides) else ["resume=auto"]
    return [entrypoint, f"trainer.num_nodes={nodes}", f"trainer.devices={gpus_per_node}",
            f"paths.output_dir={runs_dir}", f"run.name={name}", *resume, *overrides]


def node_env(*, nodes: int, gpus_per_node: int, port: int, max_restarts: int, cache_dir: str,
             nccl_env: dict[str, str], master_addr: str | None = None) -> dict[str, str]:
    """The plain environment of every node's container (the W&B key comes from a Secret, apart). Without
    master_addr the operator provides it (PyTorchJob: MASTER_ADDR; TrainJob: PET_MASTER_ADDR)."""
    env = {"GAN_NNODES": str(nodes), "GAN_NPROC_PER_NODE": str(gpus_per_node), "GAN_MASTER_PORT": str(port),
           "GAN_MAX_RESTARTS": str(max_restarts), "GAN_PIPELINE_CACHE": cache_dir}
    if master_addr:
        env["GAN_MASTER_ADDR"] = master_addr
    return {**env, **{k: str(v) for k, v in nccl_env.items()}}


def pod_env(index: int, *, nodes: int, gpus_per_node: int, port: int, max_restarts: int, cache_dir: str,
            nccl_env: dict[str, str], master_addr: str) -> dict[str, str]:
    """What pod `index` of the Indexed Job sees: node_env plus the completion index Kubernetes sets. With
    master_addr=127.0.0.1 it runs one node of the job on this machine."""
    if not 0 <= index < nodes:
        raise ValueError(f"node index {index} is outside 0..{nodes - 1}")
    env = node_env(nodes=nodes, gpus_per_node=gpus_per_node, port=port, max_restarts=max_restarts,
                   cache_dir=cache_dir, nccl_env=nccl_env, master_addr=master_addr)
    return {**env, "JOB_COMPLETION_INDEX": str(index)}


def escape_expansion(arg: str) -> str:
    """Kubernetes expands `$(VAR)` in a container's command and args and turns `$$` into `$`; doubling every `$`
    makes the process receive the string verbatim."""
    return arg.replace("$", "$$")


def expand_like_kubelet(arg: str, env: dict[str, str]) -> str:
    """What a container receives for `arg` (Kubernetes' expansion: `$$` -> `$`, `$(VAR)` -> its value if set)."""
    out, i = [], 0
    while i < len(arg):
        if arg[i] == "$" and i + 1 < len(arg) and arg[i + 1] == "$":
            out.append("$")
            i += 2
        elif arg.startswith("$(", i) and (end := arg.find(")", i)) != -1 and arg[i + 2:end] in env:
            out.append(env[arg[i + 2:end]])
            i = end + 1
        else:
            out.append(arg[i])
            i += 1
    return "".join(out)
