"""Pooled vs per-class cBN statistics on the digits, balanced and with one class rare: prints one JSON line.

    python bench/cbn_isolation.py [--kimg 30] [--seeds 0,1] [--rare-class 3] [--rare-fraction 0.1]
                                  [--out outputs/cbn-isolation]
    python bench/cbn_isolation.py --fallback-only outputs/cbn-isolation/balanced-per_class-seed0/checkpoints/last.ckpt

Trains BigGAN (`model=biggan`, the digits defaults) four times for the same number of images: with
`model.generator.cbn_stats` pooled and per_class, on the embedded digits and on an imbalanced copy in
which `--rare-class` keeps `--rare-fraction` of its images (written with gan-shards from PNG folders,
the path a user's own data takes). All runs draw grouped fake labels (`model.fake_labels.grouping=
grouped`), so the only difference is the statistics. Every final G_ema is scored by `gan-eval` against
the full, balanced digits (intra-FID per class, its mean, FID, classification accuracy), with the same
seed and sample count.

It also measures the small-count fallbacks on the balanced per_class run: for every cBN layer, the
class statistics that a class with too few samples would get, from its running per-class statistics
(`cbn_fallback=running`) or from the pooled statistics of an iid batch (`cbn_fallback=pooled`), against
the class's standing statistics (the average over many batches of that class), as the mean absolute
error of the mean and of the standard deviation in units of the class's standard deviation.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.digits import load_digits  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.layers.conditional_norm import ConditionalBatchNorm2d  # noqa: E402
from pipeline.metrics.checkpoint import build_generator, read_checkpoint  # noqa: E402
from pipeline.training.sampling import sample_labels  # noqa: E402
from pipeline.training.standing_stats import standing_statistics  # noqa: E402


def imbalanced_shards(out: Path, rare_class: int, fraction: float, seed: int) -> tuple[Path, dict[int, int]]:
    images, labels = load_digits(32)
    rng = np.random.default_rng(seed)
    keep = np.ones(len(labels), dtype=bool)
    rare = np.flatnonzero(labels == rare_class)
    keep[rng.choice(rare, size=len(rare) - max(1, round(fraction * len(rare))), replace=False)] = False
    with tempfile.TemporaryDirectory() as tmp:
        for i in np.flatnonzero(keep):
            folder = Path(tmp) / str(labels[i])
            folder.mkdir(exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
        shard_dir = out / "digits-imbalanced-shards"
        write_shards(tmp, shard_dir, resolution=32, overwrite=True, progress=False)
    return shard_dir, {int(c): int((labels[keep] == c).sum()) for c in range(10)}


def train(out: Path, name: str, stats: str, kimg: float, data: list[str], seed: int) -> tuple[Path, float]:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline.train", f"run.name={name}", f"paths.output_dir={out}", f"seed={seed}",
           f"train.kimg={kimg}", "metrics=none", "~logger", f"model.generator.cbn_stats={stats}",
           "model.fake_labels.grouping=grouped", *data]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / name / "checkpoints" / "last.ckpt", time.perf_counter() - t


def score(ckpt: Path, num_samples: int) -> dict:
    cmd = [sys.executable, "-m", "pipeline.metrics.cli", str(ckpt), "--data", "digits", "--metrics",
           "fid,intra_fid,accuracy", "--num-samples", str(num_samples), "--no-progress", "--out",
           str(ckpt.with_suffix(".balanced-eval.json"))]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result["metrics"].items()}


@torch.no_grad()
def fallback_errors(ckpt: Path, batches: int, iid_batch: int) -> dict[str, float]:
    """Mean |error| of the fallback mean and std against standing per-class statistics, in class-std units."""
    G = build_generator(read_checkpoint(str(ckpt)), use_g=False)  # G: the running statistics it trained with
    standing = copy.deepcopy(G)
    standing_statistics(standing, num_batches=batches, batch_size=80, seed=1)
    layers = [(a, b) for a, b in zip(G.modules(), standing.modules()) if isinstance(a, ConditionalBatchNorm2d)]
    # The pooled fallback: the pooled statistics of an iid batch of the training size, captured by a hook
    # on a copy in training mode (the preceding layers normalise with batch statistics, as in training).
    capture_G = copy.deepcopy(G).train()
    pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(i):
        def hook(module, args):
            x = args[0]
            pooled[i] = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
        return hook

    for i, m in enumerate(m for m in capture_G.modules() if isinstance(m, ConditionalBatchNorm2d)):
        m.register_forward_pre_hook(capture(i))
    errs = {"running_mean": [], "running_std": [], "pooled_mean": [], "pooled_std": []}
    for run, ref in layers:  # the running fallback does not depend on the batch
        std = ref.class_running_var.sqrt()  # (K, C)
        errs["running_mean"].append(((run.class_running_mean - ref.class_running_mean).abs() / std).mean())
        errs["running_std"].append(((run.class_running_var.sqrt() - std).abs() / std).mean())
    gen = torch.Generator().manual_seed(2)
    for _ in range(8):  # several iid batches: the pooled fallback varies with the batch
        z = torch.randn(iid_batch, G.z_dim, generator=gen)
        capture_G(z, sample_labels(iid_batch, torch.ones(10), generator=gen))
        for i, (_, ref) in enumerate(layers):
            std = ref.class_running_var.sqrt()
            pm, pv = pooled[i]
            errs["pooled_mean"].append(((pm - ref.class_running_mean).abs() / std).mean())
            errs["pooled_std"].append(((pv.sqrt() - std).abs() / std).mean())
    return {k: round(float(torch.stack(v).mean()), 4) for k, v in errs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kimg", type=float, default=30)
    parser.add_argument("--rare-class", type=int, default=3)
    parser.add_argument("--rare-fraction", type=float, default=0.1)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--out", default="outputs/cbn-isolation")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (one run per seed and setting)")
    parser.add_argument("--fallback-only", metavar="CKPT", help="only measure the fallbacks on this per_class checkpoint")
    args = parser.parse_args()
    if args.fallback_only:
        print(json.dumps({"bench": "cbn_fallback", "checkpoint": args.fallback_only,
                          "fallback_error_in_class_std": fallback_errors(Path(args.fallback_only), 50, 32)}))
        return
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shard_dir, counts = imbalanced_shards(out, args.rare_class, args.rare_fraction, seed=0)
    datasets = {"balanced": [], "imbalanced": ["data=folder", f"data.source={shard_dir}", "data.resolution=32",
                                               "data.channels=1", "data.num_classes=10", "data.batch_size=32"]}
    runs = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        for data_name, data in datasets.items():
            for stats in ("pooled", "per_class"):
                key = f"{data_name}/{stats}/seed{seed}"
                ckpt, seconds = train(out, key.replace("/", "-"), stats, args.kimg, data, seed)
                runs[key] = {"train_seconds": round(seconds, 1), **score(ckpt, args.num_samples)}
                print(f"{key}: {runs[key]}", file=sys.stderr)
    fallback = fallback_errors(out / f"balanced-per_class-seed{seeds[0]}" / "checkpoints" / "last.ckpt",
                               batches=50, iid_batch=32)
    print(json.dumps({"bench": "cbn_isolation", "kimg": args.kimg, "rare_class": args.rare_class,
                      "rare_fraction": args.rare_fraction, "imbalanced_class_counts": counts,
                      "eval": f"gan-eval --data digits (balanced reference), {args.num_samples} samples, G_ema",
                      "runs": runs, "fallback_error_in_class_std": fallback, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
