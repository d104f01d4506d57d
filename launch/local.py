"""`gan-launch local`: a multi-node gan-train job on this machine, one torchrun agent per simulated node.

Every node runs exactly the command a cluster node runs (`launch.torchrun.torchrun_command`), with
127.0.0.1 as the master, so that multi-node behaviour (rendezvous, node ranks, restarts after a
failed worker) can be tried and tested without a cluster. Nothing is sent to any other address.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO

from launch.torchrun import check_overrides, torchrun_command

MASTER_ADDR = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((MASTER_ADDR, 0))
        return s.getsockname()[1]


def _prefix_lines(stream: io.BufferedReader, prefix: bytes, out: IO[bytes]) -> None:
    """Copy a node's output line by line (progress bars' carriage returns too) with its node label."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            if line.strip():
                out.write(prefix + line + b"\n")
        out.flush()
    if pending.strip():
        out.write(prefix + pending + b"\n")
        out.flush()


def launch_local(*, nodes: int, nproc_per_node: int, overrides: list[str], master_port: int = 0,
                 max_restarts: int = 0, env: dict[str, str] | None = None) -> int:
    """Start the nodes, forward SIGINT/SIGTERM to them, wait; returns 0 if every node succeeded, else the
    first non-zero exit code (a node's torchrun exits non-zero when its workers failed beyond the restarts)."""
    if nodes < 1 or nproc_per_node < 1:
        raise ValueError(f"--nodes={nodes} and --nproc-per-node={nproc_per_node} must be >= 1")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts={max_restarts} must be >= 0")
    check_overrides(overrides)
    port = master_port or free_port()
    child_env = {**os.environ, **(env or {})}
    procs = []
    for node in range(nodes):
        cmd = torchrun_command(nnodes=nodes, node_rank=node, nproc_per_node=nproc_per_node, master_addr=MASTER_ADDR,
                               master_port=port, max_restarts=max_restarts, overrides=overrides)
        procs.append(subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # a terminal's Ctrl-C reaches us only
    out = sys.stdout.buffer
    copiers = [threading.Thread(target=_prefix_lines, args=(p.stdout, f"[node{i}] ".encode(), out), daemon=True)
               for i, p in enumerate(procs)]
    for t in copiers:
        t.start()

    def forward(signum: int, frame: object) -> None:
        for p in procs:  # torchrun passes it on to its workers, which checkpoint and exit (train.preempt_grace_s)
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in copiers:
            t.join(timeout=5)
    return next((c for c in codes if c != 0), 0)
