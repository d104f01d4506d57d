"""`gan-launch`: start gan-train jobs. `gan-launch local` runs N simulated nodes on this machine."""
from __future__ import annotations

import argparse
import sys

from launch.local import launch_local


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gan-launch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser(
        "local", help="a multi-node job on this machine: one torchrun agent per node, master 127.0.0.1",
        description="Run gan-train as N simulated nodes on 127.0.0.1, each a torchrun agent started as on a cluster "
                    "node (--nnodes N --node-rank i). Hydra overrides after the options go to every rank verbatim; "
                    "run.name is required, resume=auto is added unless you set resume.")
    local.add_argument("--nodes", type=int, default=2, help="simulated nodes (default 2)")
    local.add_argument("--nproc-per-node", type=int, default=1, help="worker processes per node (default 1)")
    local.add_argument("--max-restarts", type=int, default=0,
                       help="torchrun restarts all workers this many times after one fails; they resume from "
                            "the last checkpoint (default 0)")
    local.add_argument("--port", type=int, default=0, help="master port on 127.0.0.1 (default: a free one)")
    local.add_argument("overrides", nargs="*", help="Hydra overrides for gan-train, e.g. run.name=demo train.kimg=2")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = launch_local(nodes=args.nodes, nproc_per_node=args.nproc_per_node, overrides=args.overrides,
                            master_port=args.port, max_restarts=args.max_restarts)
    except ValueError as e:
        print(f"gan-launch: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
