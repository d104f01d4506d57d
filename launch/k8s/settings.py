"""The cluster settings of `gan-launch k8s` (`conf/launch/*.yaml`) and the one train setting the pods depend on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@dataclass(frozen=True, kw_only=True)
class LaunchSettings:
    """Where and how the pods run; every key is documented in conf/launch/default.yaml."""
    image: str
    namespace: str
    port: int
    pvc_name: str
    mount_path: str
    wandb_secret: str
    wandb_secret_key: str
    node_selector: dict[str, str]
    tolerations: list[dict]
    priority_class: str | None
    nccl_env: dict[str, str]
    shm_size: str
    requests: dict[str, str]
    limits: dict[str, str]
    backoff_limit: int
    max_restarts: int
    grace_margin_s: int
    run_as_user: int
    trainjob_runtime: str

    @property
    def runs_dir(self) -> str:
        return f"{self.mount_path.rstrip('/')}/runs"

    @property
    def cache_dir(self) -> str:
        return f"{self.mount_path.rstrip('/')}/cache"


def load_settings(*, overrides: list[str], launch_overrides: list[str] = (),
                  config: str = "default") -> tuple[LaunchSettings, int]:
    """Compose gan-train's config with `+launch=<config>`, as the pods will (the user's overrides included, so an
    experiment's train.preempt_grace_s counts); returns the launch settings and train.preempt_grace_s."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"+launch={config}", *launch_overrides])
        settings = instantiate(cfg.launch, _convert_="all")
        grace = int(cfg.train.preempt_grace_s)
    except (HydraException, OmegaConfBaseException, TypeError) as e:  # the message names the key or the option
        raise ValueError(f"the overrides do not compose: {e}") from e
    for key in ("port", "backoff_limit", "max_restarts", "grace_margin_s", "run_as_user"):
        if not isinstance(getattr(settings, key), int) or getattr(settings, key) < 0:
            raise ValueError(f"launch.{key}={getattr(settings, key)!r} must be an integer >= 0")
    if not settings.mount_path.startswith("/"):
        raise ValueError(f"launch.mount_path={settings.mount_path!r} must be an absolute path, e.g. /mnt/gan")
    return settings, grace
