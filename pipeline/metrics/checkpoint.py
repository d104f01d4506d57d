"""Rebuild G_ema, G or D from a gan-train checkpoint: its stored config names the class, its state dict the weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from pipeline.metrics.errors import EvalError

# A checkpoint's config could name any importable callable; only our own models are built from it.
_ALLOWED_PREFIX = "pipeline."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"CHECKPOINT {path} does not exist; give a .ckpt written by gan-train, "
                        "e.g. outputs/<run>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"CHECKPOINT {path} cannot be read as a checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); give a .ckpt written by gan-train") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise EvalError(f"CHECKPOINT {path} has no state_dict and config: it was not written by gan-train")
    return ckpt


def build_network(ckpt: dict[str, Any], node_name: str, *, prefix: str, where: str = "CHECKPOINT",
                  hint: str = "") -> nn.Module:
    """instantiate(config.model.<node_name>), then load only the `<prefix>*` weights, strictly; eval, no grad.

    A checkpoint from inside a progressive run is set to its stage (resolution, alpha).
    """
    node = ckpt["config"].get("model", {}).get(node_name)
    if not isinstance(node, dict) or not str(node.get("_target_", "")).startswith(_ALLOWED_PREFIX):
        raise EvalError(f"{where}: config.model.{node_name} is missing or does not name a pipeline model "
                        f"(_target_={node.get('_target_') if isinstance(node, dict) else None!r})")
    try:
        net = instantiate(node)
    except Exception as e:
        cause = e.__cause__ or e
        raise EvalError(f"{where}: cannot rebuild the {node_name} from its config ({cause})") from None
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise EvalError(f"{where} holds no {prefix}* weights{hint}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EvalError(f"{where}: the {prefix}* weights do not fit the {node_name} its config builds: "
                        f"{str(e).splitlines()[0]}") from None
    growth = ckpt.get("growth")
    if growth and hasattr(net, "set_growth") and (growth["resolution"] != net.resolution or growth["alpha"] < 1):
        if node_name == "generator":  # sample at its stage, upsampled to the final size
            net.set_growth(growth["resolution"], growth["alpha"], output_resolution=net.resolution)
        else:
            net.set_growth(growth["resolution"], growth["alpha"])
    return net.eval().requires_grad_(False)


def build_generator(ckpt: dict[str, Any], *, use_g: bool = False, where: str = "CHECKPOINT") -> nn.Module:
    """instantiate(config.model.generator), then load only the `G_ema.` (or `G.`) weights, strictly."""
    return build_network(ckpt, "generator", prefix="G." if use_g else "G_ema.", where=where,
                         hint="" if use_g else "; try --use-g")


def build_discriminator(ckpt: dict[str, Any], *, where: str = "CHECKPOINT") -> nn.Module:
    """instantiate(config.model.discriminator) with the `D.` weights."""
    return build_network(ckpt, "discriminator", prefix="D.", where=where)


def checkpoint_kimg(ckpt: dict[str, Any]) -> float | None:
    images = ckpt.get("counters", {}).get("images_seen")
    return None if images is None else images / 1000.0
