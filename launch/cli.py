"""`gan-launch`: start gan-train jobs. `gan-launch local` runs N simulated nodes on this machine; `gan-launch k8s`
runs them on Kubernetes, and `status`, `logs`, `delete` follow such a job."""
from __future__ import annotations

import argparse
import sys

from launch.local import launch_local
from launch.sweep import add_sweep_parser, run_sweep

_LAUNCH_PREFIXES = ("launch.", "+launch.", "++launch.", "~launch.")


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
    _k8s_parsers(sub)
    add_sweep_parser(sub)
    return parser


def _k8s_parsers(sub: argparse._SubParsersAction) -> None:
    from launch.k8s.render import TARGETS

    k8s = sub.add_parser(
        "k8s", help="a multi-node job on Kubernetes: Indexed Job + headless Service, PyTorchJob or TrainJob",
        description="Render the manifests of a gan-train job on Kubernetes, check them offline, and create them "
                    "(or print them with --dry-run). Hydra overrides after the options go to every rank verbatim; "
                    "launch.<key>=value ones change conf/launch/<--launch-config>.yaml instead. The run directory "
                    "is <launch.mount_path>/runs/<--name>; resume=auto is added unless you set resume.")
    k8s.add_argument("--target", choices=TARGETS, default="indexed-job",
                     help="indexed-job (plain Kubernetes), pytorchjob (Kubeflow training-operator) or trainjob "
                          "(Kubeflow Trainer v2); default indexed-job")
    k8s.add_argument("--nodes", type=int, default=1, help="pods, one per node (default 1)")
    k8s.add_argument("--gpus-per-node", type=int, default=1, help="GPUs and worker processes per pod (default 1)")
    k8s.add_argument("--image", help="container image (default launch.image)")
    k8s.add_argument("--name", required=True, help="job name, also run.name: a DNS label such as biggan-256-a")
    k8s.add_argument("--namespace", help="default launch.namespace")
    k8s.add_argument("--launch-config", default="default", help="conf/launch/<NAME>.yaml (default: default)")
    k8s.add_argument("--dry-run", action="store_true", help="print the manifests as YAML and create nothing")
    k8s.add_argument("overrides", nargs="*", help="Hydra overrides for gan-train (e.g. train.kimg=5000) and "
                                                  "launch.<key>=value for the cluster settings")
    for command, text in (("status", "the job's conditions and its pods' phases"),
                          ("logs", "the logs of one node's pod"),
                          ("delete", "delete the job, its pods and its Service (the run directory stays)")):
        p = sub.add_parser(command, help=text, description=f"{text[0].upper()}{text[1:]}.")
        p.add_argument("name", help="the job's --name")
        p.add_argument("--namespace", default="default", help="default: default")
        if command == "logs":
            p.add_argument("--node", type=int, default=0, help="node index (default 0, the master)")
            p.add_argument("--tail", type=int, help="only the last TAIL lines")


def run_k8s(args: argparse.Namespace, *, api: object = None, out=None) -> int:
    """`gan-launch k8s`: render, validate, then print or create."""
    import yaml

    out = out or sys.stdout
    from launch.k8s.client import apply
    from launch.k8s.render import render_job
    from launch.k8s.validate import validate_manifests

    launch_overrides = [o for o in args.overrides if o.startswith(_LAUNCH_PREFIXES)]
    overrides = [o for o in args.overrides if not o.startswith(_LAUNCH_PREFIXES)]
    manifests = render_job(target=args.target, nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image,
                           name=args.name, namespace=args.namespace, overrides=overrides,
                           launch_overrides=launch_overrides, launch_config=args.launch_config)
    try:
        validate_manifests(manifests)
    except ImportError:  # kubernetes-validate is in the dev extra; the API server checks them anyway
        print("gan-launch: kubernetes-validate is not installed (pip install -e '.[dev]'): manifests not checked "
              "offline", file=sys.stderr)
    if args.dry_run:
        out.write(yaml.safe_dump_all(manifests, sort_keys=False))
        return 0
    namespace = manifests[0]["metadata"]["namespace"]
    apply(manifests, namespace=namespace, api=api)
    print(f"created {', '.join(m['kind'] for m in manifests)} {args.name} in namespace {namespace}; "
          f"follow it with `gan-launch status {args.name} --namespace {namespace}`", file=out)
    return 0


def run_follow(args: argparse.Namespace, *, api: object = None, out=None) -> int:
    """`gan-launch status|logs|delete NAME`."""
    from launch.k8s import client

    out = out or sys.stdout
    if args.command == "status":
        text = client.status(args.name, namespace=args.namespace, api=api)
    elif args.command == "logs":
        text = client.logs(args.name, namespace=args.namespace, node=args.node, tail=args.tail, api=api)
    else:
        text = "deleted " + ", ".join(client.delete(args.name, namespace=args.namespace, api=api))
    out.write(text if text.endswith("\n") else text + "\n")
    return 0


def main(argv: list[str] | None = None, *, api: object = None) -> None:
    """`api`: the Kubernetes API objects (launch.k8s.Apis) to use instead of the kubeconfig's cluster (tests)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "k8s":
            sys.exit(run_k8s(args, api=api))
        if args.command in ("status", "logs", "delete"):
            sys.exit(run_follow(args, api=api))
        if args.command == "sweep":
            sys.exit(run_sweep(args))
        code = launch_local(nodes=args.nodes, nproc_per_node=args.nproc_per_node, overrides=args.overrides,
                            master_port=args.port, max_restarts=args.max_restarts)
    except ValueError as e:
        print(f"gan-launch: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
