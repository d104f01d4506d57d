"""`gan-eval fit-features`: train the domain classifier on real shards and save it as a feature network."""
from __future__ import annotations

import fcntl
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pipeline.data.shards import read_manifest
from pipeline.metrics.domain_net import DomainNet, save_domain_net
from pipeline.metrics.errors import EvalError
from pipeline.metrics.real_data import dataset_checksum, load_uint8

MAX_SHIFT = 2  # pixels of random translation: the only augmentation, safe for any dataset
# Defaults sized for CPU: on the 1,797 digits at 32x32 about 10 s on 2 cores, > 98% held-out accuracy.
EPOCHS, WIDTH, BATCH_SIZE, LR, HOLDOUT = 8, 16, 64, 3e-3, 0.2


def _split(n: int, holdout: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into (train, held-out) indices."""
    perm = torch.randperm(n, generator=gen)
    n_held = max(1, round(n * holdout))
    return perm[n_held:], perm[:n_held]


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Translate each image by up to MAX_SHIFT pixels, filling with the edge pixels."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _to_float(x: Tensor) -> Tensor:
    return x.float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]


@torch.no_grad()
def accuracy_of(net: DomainNet, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    net.eval()
    correct = sum(int((net(_to_float(x[i:i + batch_size]))[1].argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def fit_domain_net(shard_dir: str | Path, out: str | Path, *, epochs: int = EPOCHS, width: int = WIDTH,
                   batch_size: int = BATCH_SIZE, lr: float = LR, holdout: float = HOLDOUT, seed: int = 0,
                   max_samples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train DomainNet on the shards (a seeded held-out split is never trained on) and save it; returns the record."""
    manifest = read_manifest(shard_dir)
    if manifest["num_classes"] < 2:
        raise EvalError(f"--data {shard_dir} has no class labels (num_classes={manifest['num_classes']}); a domain "
                        "network is a classifier. Use InceptionV3 (GAN_PIPELINE_INCEPTION) for unlabelled data")
    for name, value, ok in (("--epochs", epochs, epochs >= 1), ("--width", width, width >= 1),
                            ("--batch-size", batch_size, batch_size >= 1), ("--holdout", holdout, 0 < holdout < 1)):
        if not ok:
            raise EvalError(f"{name}={value} is out of range (epochs, width, batch size >= 1; 0 < holdout < 1)")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initial weights
    x, y = load_uint8(shard_dir, max_samples)
    train_idx, held_idx = _split(len(x), holdout, gen)
    net = DomainNet(channels=x.shape[1], resolution=x.shape[-1], num_classes=manifest["num_classes"], width=width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    bar = tqdm(total=steps, desc="fit-features", unit="step", file=sys.stderr, disable=not progress)
    for _ in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            _, logits = net(_shift(_to_float(x[idx]), gen))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    acc = accuracy_of(net, x[held_idx], y[held_idx])
    classes = manifest["classes"]
    dataset = {"checksum": dataset_checksum(manifest), "source": manifest.get("source"), "shard_dir": str(shard_dir),
               "class_names": sorted(classes, key=classes.get), "num_samples": len(x),
               "resolution": manifest["resolution"], "channels": manifest["channels"],
               "num_train": len(train_idx), "num_heldout": len(held_idx)}
    training = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "holdout": holdout, "seed": seed,
                "max_shift": MAX_SHIFT, "seconds": round(time.perf_counter() - t0, 2)}
    return save_domain_net(out, net.eval(), heldout_accuracy=acc, dataset=dataset, training=training)


def ensure_domain_net(path: str | Path, shard_dir: str | Path, *, progress: bool = True) -> Path:
    """Fit the default domain network into `path` unless it is there; concurrent callers (DDP ranks) wait."""
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            print(f"gan-eval: fitting the domain feature network {path} (once; see `gan-eval fit-features`)",
                  file=sys.stderr)
            record = fit_domain_net(shard_dir, path, progress=progress)
            print(f"gan-eval: held-out accuracy {record['heldout_accuracy']:.4f} in {record['training']['seconds']} s",
                  file=sys.stderr)
    return path
