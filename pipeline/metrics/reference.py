"""Reference statistics: the real images' features, cached on disk per (dataset, resolution, feature network).

The cache file holds the features themselves, not only mean and covariance, because KID and
precision/recall need every sample. A second evaluation against the same data with the same network
reads the file instead of running the network over the real images again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.metrics.features import FeatureNet, extract_features
from pipeline.metrics.real_data import dataset_checksum, num_real, real_batches

CACHE_VERSION = 1


@dataclass
class Reference:
    """Real features (N, d), their labels (N,), and what identifies them."""

    features: Tensor
    labels: Tensor
    key: dict[str, Any]
    path: Path
    from_cache: bool

    def protocol(self) -> dict[str, Any]:
        return {**self.key, "num_real": len(self.features), "cache": str(self.path), "from_cache": self.from_cache}


def reference_key(manifest: dict[str, Any], net: FeatureNet, max_samples: int | None) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "dataset_checksum": dataset_checksum(manifest),
            "resolution": int(manifest["resolution"]), "feature_net_id": net.id,
            "split": "all shards, written order" if max_samples is None else f"first {max_samples} in written order",
            "max_samples": max_samples}


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    n = "all" if key["max_samples"] is None else str(key["max_samples"])
    name = f"ref-{key['dataset_checksum'][:16]}-{key['resolution']}px-{key['feature_net_id'][:16]}-{n}.pt"
    return Path(cache_dir) / "metrics" / name


def _read(path: Path, key: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, or a half-written/corrupt file: recompute it
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    return cached["features"], cached["labels"]


def reference_features(net: FeatureNet, manifest: dict[str, Any], shard_dir: str | Path, cache_dir: str | Path, *,
                       max_samples: int | None = None, batch_size: int = 256, device: torch.device | str = "cpu",
                       progress: bool = True) -> Reference:
    """The real features for `net`: read from the cache, or extracted once and written there."""
    key = reference_key(manifest, net, max_samples)
    path = cache_path(cache_dir, key)
    if (hit := _read(path, key)) is not None:
        return Reference(hit[0], hit[1], key, path, from_cache=True)
    feats, _, labels = extract_features(net, real_batches(shard_dir, batch_size, max_samples),
                                        total=num_real(manifest, max_samples), desc="real features",
                                        device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, "features": feats, "labels": labels}, tmp)
    tmp.replace(path)  # atomic: concurrent evaluations never read half a file
    return Reference(feats, labels, key, path, from_cache=False)
