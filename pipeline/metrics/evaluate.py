"""Evaluate a generator: sample it, embed the samples, score them against the reference, record the protocol.

Used by `gan-eval` (one process) and by the training callback (each rank samples a slice; rank 0 scores).
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.metrics import scores
from pipeline.metrics.errors import EvalError
from pipeline.metrics.features import FeatureNet, extract_features
from pipeline.metrics.reference import Reference
from pipeline.training.sampling import truncated_normal

METRICS = ("fid", "kid", "pr", "intra_fid", "accuracy")
PR_MAX_SAMPLES = 10_000  # k-NN is quadratic in the sample count; larger sets are subsampled (recorded)


def parse_metrics(names: str | list[str], *, arg: str = "--metrics") -> list[str]:
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items or (bad := [n for n in items if n not in METRICS]):
        raise EvalError(f"{arg}={','.join(items)!r}: choose from {','.join(METRICS)}")
    return list(dict.fromkeys(items))


def check_metrics(metrics: list[str], *, num_classes: int, net: FeatureNet, arg: str = "--metrics",
                  num_samples: int | None = None, class_counts: list[int] | None = None,
                  samples_arg: str = "--num-samples") -> None:
    """Per-class metrics need a conditional G (and 2 samples per class); accuracy a classifier with G's classes."""
    if num_classes == 0 and (cond := [m for m in metrics if m in ("intra_fid", "accuracy")]):
        raise EvalError(f"{arg}: {','.join(cond)} need a class-conditional generator; this one is unconditional")
    if "intra_fid" in metrics and num_samples is not None and class_counts:
        fewest = int(torch.bincount(stratified_labels(num_samples, class_counts), minlength=num_classes).min())
        if fewest < 2:
            enough = 2 * sum(class_counts) // min(class_counts) + 1
            raise EvalError(f"{samples_arg}={num_samples} leaves {fewest} sample(s) for the rarest class; intra_fid "
                            f"needs at least 2 per class: set {samples_arg} to {enough} or more")
    if "accuracy" in metrics:
        if not net.has_logits:
            raise EvalError(f"{arg}: accuracy needs a domain classifier as --feature-net (InceptionV3 knows ImageNet "
                            "classes only); write one with `gan-eval fit-features`")
        if net.net.num_classes != num_classes:
            raise EvalError(f"--feature-net classifies {net.net.num_classes} classes but the generator has "
                            f"{num_classes}; fit one on this dataset with `gan-eval fit-features`")


def stratified_labels(n: int, counts: list[int]) -> Tensor:
    """n labels in proportion to the real class counts (largest remainder), so every class is represented;
    zeros for an unconditional dataset. Fixed, not drawn: less variance than multinomial labels."""
    if not counts:
        return torch.zeros(n, dtype=torch.long)
    total = sum(counts)
    quota = [n * c / total for c in counts]
    alloc = [int(q) for q in quota]
    for c in sorted(range(len(counts)), key=lambda i: alloc[i] - quota[i])[: n - sum(alloc)]:
        alloc[c] += 1
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(alloc))


def truncation_mode(G: nn.Module) -> str:
    """StyleGAN2 takes psi (w -> w_avg + psi (w - w_avg)); BigGAN resamples |z| above a threshold."""
    return "psi" if "truncation_psi" in inspect.signature(G.forward).parameters else "z_threshold"


def generate(G: nn.Module, labels: Tensor, *, truncation: float | None, seed: int, batch_size: int,
             device: torch.device | str, progress: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    """(images (B, C, R, R), labels (B,)) from G in batches; latents (and noise) depend only on `seed`."""
    mode = truncation_mode(G)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    # Restore the training run's CUDA RNG too, so that evaluating does not change what training draws next.
    cuda = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), \
            tqdm(total=len(labels), desc="generate", unit="img", file=sys.stderr, disable=not progress,
                 leave=False) as bar:
        torch.manual_seed(seed)  # StyleGAN2's per-pixel noise comes from the global RNG
        for i in range(0, len(labels), batch_size):
            y = labels[i:i + batch_size]
            if mode == "psi":
                z = torch.randn(len(y), G.z_dim, generator=gen)
                kwargs = {} if truncation is None else {"truncation_psi": truncation}
            else:
                z, kwargs = truncated_normal((len(y), G.z_dim), truncation, generator=gen), {}
            with torch.no_grad():
                x = G(z.to(device), y.to(device), **kwargs)
            bar.update(len(y))
            yield x, y


def fake_features(G: nn.Module, net: FeatureNet, labels: Tensor, *, truncation: float | None, seed: int,
                  batch_size: int, device: torch.device | str, progress: bool = True
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
    batches = generate(G, labels, truncation=truncation, seed=seed, batch_size=batch_size, device=device,
                       progress=progress)
    return extract_features(net, batches, total=len(labels), desc="fake features", device=device,
                            progress=progress)


def _subsample(x: Tensor, m: int, seed: int) -> Tensor:
    return x if len(x) <= m else x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:m]]


def compute_scores(metrics: list[str], ref: Reference, fake: Tensor, fake_logits: Tensor | None, fake_labels: Tensor,
                   *, num_classes: int, k: int = 3, kid_subsets: int = 100, seed: int = 0
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """Flat {name: value} (e.g. fid, kid, kid_std, precision, recall, intra_fid, intra_fid/3, accuracy) and the
    metric-specific protocol entries."""
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    if "fid" in metrics:
        values["fid"] = scores.fid(ref.features, fake)
    if "kid" in metrics:
        values["kid"], values["kid_std"], size = scores.kid(ref.features, fake, subsets=kid_subsets, seed=seed)
        details["kid"] = {"subsets": kid_subsets, "subset_size": size, "kernel": "(x.y/d + 1)^3"}
    if "pr" in metrics:
        m = min(len(ref.features), len(fake), PR_MAX_SAMPLES)
        values["precision"], values["recall"] = scores.precision_recall(
            _subsample(ref.features, m, seed), _subsample(fake, m, seed + 1), k=k)
        details["pr"] = {"k": k, "num_samples_each": m}
    if "intra_fid" in metrics:
        mean, per_class = scores.intra_fid(ref.features, ref.labels, fake, fake_labels, num_classes)
        values["intra_fid"] = mean
        values.update({f"intra_fid/{c}": v for c, v in enumerate(per_class)})
        details["intra_fid"] = {"fake_per_class": torch.bincount(fake_labels, minlength=num_classes).tolist(),
                                "real_per_class": torch.bincount(ref.labels, minlength=num_classes).tolist()}
    if "accuracy" in metrics:
        values["accuracy"] = scores.accuracy(fake_logits, fake_labels)
    return values, details


def protocol(*, net: FeatureNet, ref: Reference, num_samples: int, generator: str, truncation: float | None,
             truncation_kind: str, kimg: float | None, seed: int, details: dict[str, Any]) -> dict[str, Any]:
    """Everything a metric value depends on, stored with it."""
    return {"generator": generator, "kimg": kimg, "num_samples": num_samples,
            "labels": "stratified by the real class frequencies", "seed": seed,
            "truncation": None if truncation is None else {"value": truncation, "kind": truncation_kind},
            "quantization": "clamped to [-1, 1], rounded to 8 bits", "feature_net": net.protocol(),
            "reference": ref.protocol(), **details}


def evaluate(G: nn.Module, net: FeatureNet, ref: Reference, *, metrics: list[str], num_samples: int,
             class_counts: list[int], truncation: float | None = None, seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", k: int = 3, kid_subsets: int = 100, generator: str = "G_ema",
             kimg: float | None = None, progress: bool = True) -> dict[str, Any]:
    """One process: {"metrics": {name: value}, "protocol": {...}}."""
    num_classes = len(class_counts)
    check_metrics(metrics, num_classes=num_classes, net=net)
    labels = stratified_labels(num_samples, class_counts)
    fake, logits, fake_labels = fake_features(G, net, labels, truncation=truncation, seed=seed,
                                              batch_size=batch_size, device=device, progress=progress)
    values, details = compute_scores(metrics, ref, fake, logits, fake_labels, num_classes=num_classes, k=k,
                                     kid_subsets=kid_subsets, seed=seed)
    return {"metrics": values,
            "protocol": protocol(net=net, ref=ref, num_samples=num_samples, generator=generator,
                                 truncation=truncation, truncation_kind=truncation_mode(G), kimg=kimg, seed=seed,
                                 details=details)}
