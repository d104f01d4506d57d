"""Rebuild G_ema (or G) from a gan-train checkpoint: its stored config names the class, its state dict the weights."""
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


def build_generator(ckpt: dict[str, Any], *, use_g: bool = False, where: str = "CHECKPOINT") -> nn.Module:
    """instantiate(config.model.generator), then load only the `G_ema.` (or `G.`) weights, strictly."""
    node = ckpt["config"].get("model", {}).get("generator")
    if not isinstance(node, dict) or not str(node.get("_target_", "")).startswith(_ALLOWED_PREFIX):
        raise EvalError(f"{where}: config.model.generator is missing or does not name a pipeline model "
                        f"(_target_={node.get('_target_') if isinstance(node, dict) else None!r})")
    try:
        G = instantiate(node)
    except Exception as e:
        cause = e.__cause__ or e
        raise EvalError(f"{where}: cannot rebuild the generator from its config ({cause})") from None
    prefix = "G." if use_g else "G_ema."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise EvalError(f"{where} holds no {prefix}* weights" + ("" if use_g else "; try --use-g"))
    try:
        G.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EvalError(f"{where}: the {prefix}* weights do not fit the generator its config builds: "
                        f"{str(e).splitlines()[0]}") from None
    growth = ckpt.get("growth")
    if growth and hasattr(G, "set_growth") and (growth["resolution"] != G.resolution or growth["alpha"] < 1):
        # A checkpoint from inside a progressive run: sample at its stage, upsampled to the final size.
        G.set_growth(growth["resolution"], growth["alpha"], output_resolution=G.resolution)
    return G.eval().requires_grad_(False)


def checkpoint_kimg(ckpt: dict[str, Any]) -> float | None:
    images = ckpt.get("counters", {}).get("images_seen")
    return None if images is None else images / 1000.0
