"""Feature networks behind one interface, which one to use, and batched feature extraction.

A FeatureNet maps images (N, C, R, R) in [-1, 1] to features (N, d) and, for a domain network, class
logits (N, K). Inputs are first clamped and rounded to 8-bit levels: real images come from 8-bit
PNGs, so generated ones are quantized the same way (as StyleGAN2-ADA's metrics do) and neither set
gets an advantage from precision the other cannot have.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.metrics.domain_net import DomainNet, domain_net_from_record, is_domain_net_file
from pipeline.metrics.errors import EvalError
from pipeline.metrics.fit import ensure_domain_net
from pipeline.metrics.inception import HOW_TO_OBTAIN, WEIGHTS_SHA256_PREFIX, load_inception

INCEPTION_ENV = "GAN_PIPELINE_INCEPTION"
INCEPTION_SHA_ENV = "GAN_PIPELINE_INCEPTION_SHA256"


def to_8bit_grid(x: Tensor) -> Tensor:
    """Clamp to [-1, 1] and round to the 256 levels of an 8-bit image."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class FeatureNet(nn.Module):
    """x (N, C, R, R) in [-1, 1] -> (features (N, d), logits (N, K) or None)."""

    def __init__(self, net: nn.Module, *, kind: str, net_id: str, info: dict[str, Any]) -> None:
        super().__init__()
        self.net, self.kind, self.id, self.info = net, kind, net_id, info
        self.num_features = int(net.num_features)
        self.has_logits = isinstance(net, DomainNet)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.net(to_8bit_grid(x))
        return out if isinstance(out, tuple) else (out, None)

    def check_input(self, channels: int, resolution: int, where: str) -> None:
        """A domain network only knows the images it was trained on: same channels and resolution."""
        if not isinstance(self.net, DomainNet):
            return
        if (self.net.channels, self.net.resolution) != (channels, resolution):
            raise EvalError(f"--feature-net {self.info.get('path')} was fitted on {self.net.channels}-channel "
                            f"{self.net.resolution}px images but {where} has {channels}-channel {resolution}px ones; "
                            f"fit one on this data: gan-eval fit-features --data <shards> --out PATH")

    def protocol(self) -> dict[str, Any]:
        """What identifies the features in a metric record."""
        return {"kind": self.kind, "id": self.id, "num_features": self.num_features, **self.info}


def domain_feature_net(record: dict[str, Any], path: str | Path) -> FeatureNet:
    net = domain_net_from_record(record, str(path))
    info = {"path": str(path), "heldout_accuracy": record["heldout_accuracy"],
            "dataset_checksum": record["dataset"]["checksum"], "layer": "penultimate (global average pool)"}
    return FeatureNet(net, kind="domain", net_id=record["id"], info=info)


def inception_feature_net(path: str | Path | None, sha256: str | None = None) -> FeatureNet:
    expected = sha256 or os.environ.get(INCEPTION_SHA_ENV) or WEIGHTS_SHA256_PREFIX
    net, digest = load_inception(path, expected_sha256=expected)
    return FeatureNet(net, kind="inception", net_id=digest,
                      info={"path": str(path), "layer": "pool3 (2048)", "resize": "bilinear to 299"})


def _peek(path: Path) -> Any:
    """torch.load without reading every tensor when the format allows (an Inception file is 95 MB)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the pre-1.6 (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def load_feature_net(path: str | Path, *, inception_sha256: str | None = None) -> FeatureNet:
    """A `gan-eval fit-features` file or an InceptionV3 FID weights file, told apart by their contents."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--feature-net {path} does not exist. Give a file written by `gan-eval fit-features`, "
                        f"or the InceptionV3 weights: {HOW_TO_OBTAIN}")
    try:
        obj = _peek(path)
    except Exception as e:
        raise EvalError(f"--feature-net {path} cannot be read as a torch file ({e})") from None
    if is_domain_net_file(obj):
        return domain_feature_net(obj, path)
    return inception_feature_net(path, inception_sha256)


def resolve_feature_net(spec: str | None, *, manifest: dict[str, Any], shard_dir: str | Path, cache_dir: str | Path,
                        inception_sha256: str | None = None, progress: bool = True) -> FeatureNet:
    """spec: a file path; 'inception' ($GAN_PIPELINE_INCEPTION); None/'auto': the domain network for the
    embedded digits (fitted into the cache on first use), InceptionV3 for any other dataset."""
    if spec not in (None, "", "auto", "inception"):
        return load_feature_net(spec, inception_sha256=inception_sha256)
    if spec != "inception" and manifest.get("source") == "digits":
        path = Path(cache_dir) / "metrics" / f"domain-digits-{manifest['resolution']}.pt"
        return load_feature_net(ensure_domain_net(path, shard_dir, progress=progress))
    env = os.environ.get(INCEPTION_ENV)
    if not env:
        raise EvalError(f"no feature network: pass --feature-net PATH (a `gan-eval fit-features` file) or set "
                        f"{INCEPTION_ENV} to the InceptionV3 weights. To obtain them, {HOW_TO_OBTAIN}")
    return inception_feature_net(env, inception_sha256)


@torch.no_grad()
def extract_features(net: FeatureNet, batches: Iterable[tuple[Tensor, Tensor]], *, total: int | None = None,
                     desc: str = "features", device: torch.device | str = "cpu", progress: bool = True
                     ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Run `net` over (x, y) batches -> (features (N, d) float32, logits (N, K) or None, labels (N,)), on CPU."""
    feats, logits, labels = [], [], []
    net.eval()
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False) as bar:
        for x, y in batches:
            f, lg = net(x.to(device))
            feats.append(f.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
            labels.append(y.cpu())
            bar.update(len(x))
    if not feats:
        raise EvalError("no images to extract features from")
    return torch.cat(feats), (torch.cat(logits) if logits else None), torch.cat(labels)
