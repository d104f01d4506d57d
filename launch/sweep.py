"""`gan-launch sweep`: W&B sweeps of gan-train.

`config` writes a W&B sweep config from a conf/hparams_search file or --param options, both in Hydra's sweep
syntax (`1,2`, `choice(...)`, `range(...)`, `interval(...)`, `tag(log, interval(...))`); its `command` runs
gan-train with each parameter as a Hydra override (wandb's ${args_no_hyphens} gives `key=value`).
`agent` takes the sweep's trials and starts each one as a Kubernetes job (launch/k8s) named after the trial.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, OverrideType, RangeSweep
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
METHODS = ("grid", "random", "bayes")
_PREFIX = {OverrideType.CHANGE: "", OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}


class LaunchJob(Protocol):
    def __call__(self, name: str, overrides: list[str], *, env: dict[str, str]) -> None: ...


# ---- sweep config ---------------------------------------------------------------------------------
def _parse(key: str, value: str) -> Override:
    try:
        return OverridesParser.create().parse_override(f"{key}={value}")
    except Exception as e:  # Hydra's grammar errors say where the value stops parsing
        raise ValueError(f"sweep parameter {key}={value}: not Hydra sweep syntax ({e}); e.g. {key}=1,2 or "
                         f"{key}='tag(log, interval(1e-5, 1e-3))'") from None


def hydra_value(value: Any) -> Any:
    """A value that reads back as itself in a `key=value` Hydra override: strings Hydra would parse otherwise
    (commas, brackets, quotes, `null`, numbers as text) are quoted; other types pass through as YAML."""
    if value is None:
        return "null"
    if not isinstance(value, str):
        return value
    try:
        plain = OverridesParser.create().parse_override(f"k={value}")
        if not plain.is_sweep_override() and plain.value() == value and isinstance(plain.value(), str):
            return value
    except Exception:
        pass
    return hydra_quote(value)


def hydra_quote(value: str) -> str:
    """A single-quoted Hydra string. Hydra's backslashes are literal except before a quote (and the closing
    one): those runs are doubled, and the quotes escaped."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def wandb_parameter(key: str, sweep: str) -> tuple[str, dict[str, Any]]:
    """One Hydra sweep override -> (W&B parameter name, its spec: value, values or a distribution)."""
    o = _parse(key, str(sweep))
    if o.type not in _PREFIX:
        raise ValueError(f"sweep parameter {key}: deleting a key (~) cannot be swept")
    name, v = _PREFIX[o.type] + o.key_or_group, o.value()
    if isinstance(v, (ChoiceSweep, RangeSweep)):
        return name, {"values": [hydra_value(x) for x in o.sweep_iterator()]}
    if isinstance(v, IntervalSweep):
        if isinstance(v.start, int) and isinstance(v.end, int):
            return name, {"distribution": "int_uniform", "min": v.start, "max": v.end}
        kind = "log_uniform_values" if "log" in v.tags else "uniform"
        return name, {"distribution": kind, "min": float(v.start), "max": float(v.end)}
    return name, {"value": hydra_value(v)}


def search_file(ref: str) -> Path:
    """--from: a conf/hparams_search name (lr) or a YAML path."""
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else CONF_DIR / "hparams_search" / f"{ref}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml")))
        raise ValueError(f"--from {ref}: no such file {path}; choose one of {names} or give a YAML path")
    return path


def _search_params(ref: str) -> tuple[dict[str, str], dict[str, Any]]:
    """hydra.sweeper.params of a search file, and what else it says (sweep.*, n_trials)."""
    node = OmegaConf.load(search_file(ref))
    sweeper = OmegaConf.select(node, "hydra.sweeper") or {}
    if not sweeper.get("params"):
        raise ValueError(f"--from {ref}: hydra.sweeper.params is empty; nothing to sweep")
    extra = OmegaConf.to_container(node.get("sweep") or OmegaConf.create(), resolve=False)
    if sweeper.get("n_trials"):
        extra["run_cap"] = int(sweeper.n_trials)
    return {str(k): str(v) for k, v in sweeper.params.items()}, extra


def _sweep_defaults(overrides: list[str], search: dict[str, Any]) -> dict[str, Any]:
    """sweep.metric and sweep.direction as gan-train composes them: the overrides win over the search file's
    sweep.*, which wins over conf/train.yaml. Composing also checks the overrides before a sweep starts."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides))
    except Exception as e:  # Hydra's message names the override that does not compose
        raise ValueError(f"the trial overrides do not compose: {e}") from None
    given = {o.partition("=")[0].lstrip("+") for o in overrides}
    return {k: search[k] if k in search and f"sweep.{k}" not in given else cfg.sweep[k]
            for k in ("metric", "direction")}


def sweep_config(params: dict[str, str], *, overrides: list[str] = (), metric: str, direction: str,
                 method: str | None = None, name: str | None = None, run_cap: int | None = None) -> dict[str, Any]:
    """The W&B sweep config: gan-train with the fixed `overrides`, then one `key=value` per parameter."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"sweep.direction={direction!r}: use minimize or maximize")
    parameters = dict(wandb_parameter(k, v) for k, v in params.items())
    if not parameters:
        raise ValueError("nothing to sweep: give --from <hparams_search> or --param key=values")
    discrete = all("distribution" not in spec for spec in parameters.values())
    method = method or ("grid" if discrete else "bayes")
    if method not in METHODS or (method == "grid" and not discrete):
        raise ValueError(f"--method {method}: choose from {', '.join(METHODS)}; grid needs lists, not intervals")
    config = {"method": method, **({"name": name} if name else {}),
              "metric": {"name": f"metrics/{metric}", "goal": direction},  # as MetricsCallback logs it
              "parameters": parameters,
              "command": ["${env}", "gan-train", *overrides, "${args_no_hyphens}"]}
    if run_cap:
        config["run_cap"] = run_cap
    return config


def _config_command(args: argparse.Namespace) -> int:
    params, extra = _search_params(args.search) if args.search else ({}, {})
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item}: use key=values, e.g. --param model.g_opt.lr=1e-4,2e-4")
        params[key] = value
    defaults = _sweep_defaults(args.overrides, extra)
    config = sweep_config(params, overrides=args.overrides, metric=args.metric or defaults["metric"],
                          direction=args.goal or defaults["direction"], method=args.method, name=args.name,
                          run_cap=args.run_cap or extra.get("run_cap"))
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; create the sweep with `wandb sweep {args.output}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# ---- agent ----------------------------------------------------------------------------------------
def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as Hydra overrides, formatted as wandb's ${args_no_hyphens} formats them."""
    return [f"{k}={v}" for k, v in params.items()]


def trial_name(sweep_id: str, run_id: str, prefix: str = "sweep") -> str:
    """A DNS label (Kubernetes job name, run.name) unique per trial: <prefix>-<sweep id>-<run id>."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{sweep_id.rsplit('/', 1)[-1]}-{run_id}".lower())
    return name.strip("-")


def _read_trial() -> tuple[str, str, dict[str, Any]]:
    """Inside wandb.agent's function: the trial's run id, sweep id and parameters (the agent's param file)."""
    with open(os.environ["WANDB_SWEEP_PARAM_PATH"]) as f:
        config = yaml.safe_load(f) or {}
    params = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()
              if k not in ("wandb_version", "_wandb")}
    return os.environ["WANDB_RUN_ID"], os.environ["WANDB_SWEEP_ID"], params


def run_agent(sweep_id: str, *, launch_job: LaunchJob, overrides: list[str] = (), count: int | None = None,
              project: str | None = None, entity: str | None = None, prefix: str = "sweep",
              agent: Callable[..., None] | None = None) -> list[str]:
    """Start each trial of the sweep as one job; returns the job names. `agent` is wandb.agent (tests: a fake).

    The job gets WANDB_SWEEP_ID and WANDB_RUN_ID: wandb.init in gan-train then reports to this trial's run
    (inside a sweep wandb ignores the id gan-train passes), so the sweep sees metrics/<sweep.metric>.
    """
    launched: list[str] = []
    parts = sweep_id.split("/")
    if len(parts) == 3:  # ENTITY/PROJECT/ID: the jobs' runs must land in the sweep's project
        entity, project = entity or parts[0], project or parts[1]

    def trial() -> None:
        run_id, sweep, params = _read_trial()
        name = trial_name(sweep, run_id, prefix)
        env = {"WANDB_SWEEP_ID": sweep, "WANDB_RUN_ID": run_id,
               **({"WANDB_PROJECT": project} if project else {}), **({"WANDB_ENTITY": entity} if entity else {})}
        launch_job(name, [*overrides, *trial_overrides(params)], env=env)
        print(f"gan-launch sweep: trial {run_id} -> job {name}", file=sys.stderr)
        launched.append(name)

    if agent is None:
        import wandb

        agent = wandb.agent
    agent(sweep_id, function=trial, count=count, project=project, entity=entity)
    return launched


def _add_env(manifests: Any, env: dict[str, str]) -> None:
    """Adds env to every container of the rendered manifests (plain dicts), keeping variables already set."""
    if isinstance(manifests, list):
        for item in manifests:
            _add_env(item, env)
    elif isinstance(manifests, dict):
        for container in manifests.get("containers", []):
            have = {e["name"] for e in container.setdefault("env", [])}
            container["env"] += [{"name": k, "value": v} for k, v in env.items() if k not in have]
        for value in manifests.values():
            _add_env(value, env)


def k8s_launcher(*, target: str, nodes: int, gpus_per_node: int, image: str | None,
                 namespace: str | None) -> LaunchJob:
    """launch_job that renders and applies one gan-launch k8s job per trial."""
    def launch_job(name: str, overrides: list[str], *, env: dict[str, str]) -> None:
        from launch import k8s  # lazily: the Kubernetes client only when a job is started

        manifests = k8s.render_job(target=target, nodes=nodes, gpus_per_node=gpus_per_node, image=image,
                                   name=name, namespace=namespace, overrides=overrides)
        _add_env(manifests, env)
        k8s.apply(manifests, namespace=manifests[0]["metadata"]["namespace"])  # --namespace, else conf/launch's
    return launch_job


def _agent_command(args: argparse.Namespace) -> int:
    launch_job = k8s_launcher(target=args.target, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                              image=args.image, namespace=args.namespace)
    run_agent(args.sweep_id, launch_job=launch_job, overrides=args.overrides, count=args.count,
              project=args.project, entity=args.entity, prefix=args.prefix)
    return 0


# ---- command line -----------------------------------------------------------------------------------
def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    sweep = subparsers.add_parser("sweep", help="W&B sweeps: write a sweep config, or run its trials on Kubernetes",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = sweep.add_subparsers(dest="sweep_command", required=True)
    config = sub.add_parser("config", help="write a W&B sweep config (YAML) for gan-train",
                            description="Parameters in Hydra's sweep syntax, from --from and --param; overrides "
                                        "after the options are fixed for every trial. Then: wandb sweep FILE.")
    config.add_argument("--from", dest="search", help="a conf/hparams_search name (lr, r1_gamma, optuna) or YAML path")
    config.add_argument("--param", action="append", default=[],
                        help="e.g. model.g_opt.lr=1e-4,2e-4 or 'model.d_opt.lr=tag(log, interval(1e-5,1e-3))'",
                        metavar="KEY=SWEEP")
    config.add_argument("--method", choices=METHODS, help="default: grid for lists only, else bayes")
    config.add_argument("--metric", help="a metrics value to optimize (default: sweep.metric, e.g. fid)")
    config.add_argument("--goal", choices=("minimize", "maximize"), help="default: sweep.direction")
    config.add_argument("--name", help="the sweep's name in W&B")
    config.add_argument("--run-cap", type=int, help="at most this many trials (default: the search's n_trials)")
    config.add_argument("-o", "--output", help="write here instead of stdout")
    config.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. train.kimg=20")

    agent = sub.add_parser("agent", help="run a W&B sweep's trials as Kubernetes jobs (one job per trial)",
                           description="Takes --count trials from the sweep and starts each as a gan-launch k8s job "
                                       "named <prefix>-<sweep id>-<run id> (also its run.name); the trial's "
                                       "parameters become Hydra overrides after the fixed ones.")
    agent.add_argument("sweep_id", help="SWEEP_ID or ENTITY/PROJECT/SWEEP_ID, as `wandb sweep` prints it")
    agent.add_argument("--count", type=int, default=1, help="trials to start (default 1)")
    agent.add_argument("--project", help="the sweep's W&B project (default: from the sweep id or the environment)")
    agent.add_argument("--entity", help="the sweep's W&B entity")
    agent.add_argument("--prefix", default="sweep", help="job name prefix (default sweep)")
    agent.add_argument("--target", default="indexed-job", help="indexed-job | pytorchjob | trainjob (gan-launch k8s)")
    agent.add_argument("--nodes", type=int, default=1)
    agent.add_argument("--gpus-per-node", type=int, default=1)
    agent.add_argument("--image", help="container image (default: conf/launch)")
    agent.add_argument("--namespace", help="Kubernetes namespace (default: conf/launch)")
    agent.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. train.kimg=20")
    return sweep


def run_sweep(args: argparse.Namespace) -> int:
    try:
        return _config_command(args) if args.sweep_command == "config" else _agent_command(args)
    except ValueError as e:
        print(f"gan-launch sweep: {e}", file=sys.stderr)
        return 2
