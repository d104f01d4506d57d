"""The real images of a gan-shards dataset for evaluation: its checksum, batches in written order, class counts."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data import storage
from pipeline.data.shards import DatasetError, ensure_shards, iterate_shards, read_manifest
from pipeline.data.stream import to_float
from pipeline.metrics.errors import EvalError

# What identifies the data: the shards' bytes (sha256) and how they are read. Not `source`, a path
# that changes when the folder moves.
_IDENTITY_KEYS = ("format_version", "shards", "num_samples", "classes", "resolution", "channels", "mode", "skipped")


def dataset_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's identifying fields (which include every shard's sha256)."""
    identity = {k: manifest.get(k) for k in _IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def find_shards(source: str, cache_dir: str | Path, resolution: int, *, arg: str = "--data"
                ) -> tuple[Path | str, dict]:
    """(shard location, manifest) for 'digits' (written into cache_dir on first use), a gan-shards folder, or an
    fsspec URL / pipe: command holding one (pipeline/data/storage.py)."""
    try:
        shard_dir = source if storage.local_path(source) is None else ensure_shards(source, cache_dir,
                                                                                    resolution=resolution)
        return shard_dir, read_manifest(shard_dir)
    except (ValueError, OSError) as e:  # DatasetError is a ValueError
        raise EvalError(f"{arg}={source!r}: {e}") from None


def to_unit_range(pixels: np.ndarray) -> Tensor:
    """uint8 (H, W) or (H, W, 3) -> float32 (C, H, W) in [-1, 1], as the data module serves them."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return to_float(torch.from_numpy(pixels).permute(2, 0, 1))


def real_batches(shard_dir: str | Path, batch_size: int, max_samples: int | None = None
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """(x (B, C, H, W) in [-1, 1], y (B,)) over the shards in written order, the first `max_samples` only."""
    images, labels = [], []
    try:
        for i, (_, pixels, label) in enumerate(iterate_shards(shard_dir)):
            if max_samples is not None and i >= max_samples:
                break
            images.append(to_unit_range(pixels))
            labels.append(label)
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
    except DatasetError as e:
        raise EvalError(str(e)) from None
    if images:
        yield torch.stack(images), torch.tensor(labels)


def load_uint8(shard_dir: str | Path, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """All images as uint8 (N, C, H, W) and labels (N,): what a classifier trains on in memory."""
    images, labels = [], []
    for i, (_, pixels, label) in enumerate(iterate_shards(shard_dir)):
        if max_samples is not None and i >= max_samples:
            break
        images.append(pixels[:, :, None] if pixels.ndim == 2 else pixels)
        labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels)


def num_real(manifest: dict[str, Any], max_samples: int | None) -> int:
    n = int(manifest["num_samples"])
    return n if max_samples is None else min(n, max_samples)


def class_counts(manifest: dict[str, Any]) -> list[int]:
    """Samples per label (empty for an unconditional dataset)."""
    return [int(manifest["class_counts"][str(i)]) for i in range(int(manifest["num_classes"]))]
