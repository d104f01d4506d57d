"""A small CNN classifier trained on the real data: its penultimate layer is a domain feature network.

For datasets far from ImageNet (digits, medical, satellite) Inception features say little and the
weights may not be at hand; a classifier trained on the dataset itself gives features that separate
what matters there, and its logits give the classification accuracy of conditional samples.
The saved file is plain data (state dict, architecture, held-out accuracy, dataset checksum and a
content id) and loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.metrics.errors import EvalError

FORMAT = "gan-pipeline/domain-net"
VERSION = 1
MAX_INPUT = 64  # larger images are area-downsampled to 64x64 first, which keeps the net CPU-sized


def _stage(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class DomainNet(nn.Module):
    """x (N, C, R, R) in [-1, 1] -> (features (N, 4*width), logits (N, num_classes)).

    Three stages of two 3x3 conv-BN-ReLU layers (width, 2*width, 4*width channels), 2x average pooling
    between stages, global average pooling, a linear classifier. Features are the pooled activations.
    """

    def __init__(self, *, channels: int, resolution: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a domain classifier needs at least 2 classes, got num_classes={num_classes}")
        self.channels, self.resolution, self.num_classes, self.width = channels, resolution, num_classes, width
        self.num_features = 4 * width
        self.body = nn.Sequential(*_stage(channels, width), nn.AvgPool2d(2),
                                  *_stage(width, 2 * width), nn.AvgPool2d(2),
                                  *_stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    @property
    def arch(self) -> dict[str, int]:
        return {"channels": self.channels, "resolution": self.resolution, "num_classes": self.num_classes,
                "width": self.width}

    def features(self, x: Tensor) -> Tensor:
        if x.shape[-1] > MAX_INPUT:
            x = F.interpolate(x, size=(MAX_INPUT, MAX_INPUT), mode="area")
        return self.body(x).mean(dim=(2, 3))  # (N, 4*width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return h, self.head(h)


def content_id(arch: dict[str, Any], state_dict: dict[str, Tensor]) -> str:
    """sha256 of the architecture and every tensor's bytes, in key order: the network's identity."""
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_domain_net(path: str | Path, net: DomainNet, *, heldout_accuracy: float, dataset: dict[str, Any],
                    training: dict[str, Any]) -> dict[str, Any]:
    """Write the network as plain data; returns the record (its `id` is the content hash)."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    record = {"format": FORMAT, "version": VERSION, "id": content_id(net.arch, state), "arch": net.arch,
              "state_dict": state, "heldout_accuracy": float(heldout_accuracy), "dataset": dataset,
              "training": training}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(record, tmp)
    tmp.replace(path)  # readers never see half a file
    return record


def is_domain_net_file(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def domain_net_from_record(record: dict[str, Any], where: str) -> DomainNet:
    """Rebuild the network from a loaded record and check its content id."""
    if record.get("version") != VERSION:
        raise EvalError(f"{where} is a domain network of version {record.get('version')}, expected {VERSION}; "
                        "fit it again with `gan-eval fit-features`")
    if content_id(record["arch"], record["state_dict"]) != record["id"]:
        raise EvalError(f"{where} fails its checksum (content id {record['id'][:12]}... does not match its "
                        "weights): the file is corrupt; fit it again with `gan-eval fit-features`")
    net = DomainNet(**record["arch"])
    net.load_state_dict(record["state_dict"], strict=True)
    return net.eval().requires_grad_(False)


def load_domain_net(path: str | Path) -> tuple[DomainNet, dict[str, Any]]:
    """(network in eval mode, the record without its state dict)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--feature-net {path} does not exist; write one with "
                        f"`gan-eval fit-features --data <digits or shard dir> --out {path}`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"--feature-net {path} cannot be read ({e}); fit it again with `gan-eval fit-features`") \
            from None
    if not is_domain_net_file(record):
        raise EvalError(f"--feature-net {path} is not a domain network written by `gan-eval fit-features`")
    net = domain_net_from_record(record, str(path))
    return net, {k: v for k, v in record.items() if k != "state_dict"}
