"""Weights & Biases logger: online when an API key is configured, offline otherwise."""
from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
        return any(host in auth.hosts for host in ("api.wandb.ai", os.environ.get("WANDB_BASE_URL", "")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """auto -> online with an API key (env WANDB_API_KEY or `wandb login`), else offline."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"mode={mode!r} must be auto, online, offline or disabled")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled", "online"):
        return {"dryrun": "offline"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    return "online" if _has_api_key() else "offline"


def wandb_logger(*, project: str, save_dir: str, mode: str = "auto", name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, run_id: str | None = None,
                 entity: str | None = None) -> WandbLogger:
    """A Lightning WandbLogger. `mode` goes to wandb.init, not to WANDB_MODE, so it doesn't leak process-wide."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, group=group, tags=list(tags or []),
                       id=run_id, entity=entity, resume="allow" if run_id else None, mode=resolve_mode(mode),
                       log_model=False)
