"""`gan-eval`: score a checkpoint's generator, or fit the domain feature network.

    gan-eval CHECKPOINT [--metrics fid,kid,pr,intra_fid,accuracy] [--num-samples N] [--truncation PSI]
                        [--feature-net PATH] [--use-g]
    gan-eval fit-features --data <digits | shard dir | data config .yaml> --out PATH [--epochs E]

The evaluation prints one JSON object (metrics and their protocol) and writes it next to the checkpoint
as <stem>.eval.json. Bad input exits with code 2 and one line that names the argument.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pipeline.metrics import fit
from pipeline.metrics.checkpoint import build_generator, checkpoint_kimg, read_checkpoint
from pipeline.metrics.errors import EvalError
from pipeline.metrics.evaluate import METRICS, check_metrics, evaluate, parse_metrics, truncation_mode
from pipeline.metrics.features import resolve_feature_net
from pipeline.metrics.real_data import class_counts, find_shards
from pipeline.metrics.reference import reference_features
from pipeline.training.standing_stats import standing_statistics

DEFAULT_CACHE = ".cache/gan-pipeline"


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-eval", description="Score G_ema of a gan-train checkpoint. "
                                "`gan-eval fit-features --help` for the domain feature network.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by gan-train")
    p.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)} (default: fid,kid,pr, plus "
                   "intra_fid for a conditional G and accuracy with a domain feature network)")
    p.add_argument("--num-samples", type=int, default=10_000, help="generated samples (default 10000)")
    p.add_argument("--truncation", type=float, help="StyleGAN2: psi; BigGAN: resample |z| above it (default none)")
    p.add_argument("--feature-net", help="a `gan-eval fit-features` file, InceptionV3 FID weights, or 'inception' "
                   "($GAN_PIPELINE_INCEPTION); default: a domain net for digits, InceptionV3 otherwise")
    p.add_argument("--use-g", action="store_true", help="evaluate G instead of G_ema")
    p.add_argument("--standing-stats", type=int, default=0, metavar="BATCHES",
                   help="re-estimate G's BatchNorm statistics (per class with cbn_stats=per_class) over this many "
                        "forward passes of --batch-size before sampling (BigGAN's standing statistics; default 0: off)")
    p.add_argument("--data", help="real data: 'digits' or a gan-shards folder (default: the checkpoint's data.source)")
    p.add_argument("--cache-dir", help="reference statistics and digits shards (default: $GAN_PIPELINE_CACHE, "
                   "else the checkpoint's paths.cache_dir)")
    p.add_argument("--max-real", type=int, help="use only the first N real images (default: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="latents and KID/PR subsets (default 0)")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall (default 3)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--inception-sha256", help="expected sha256 (or prefix) of the InceptionV3 weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="where to write the JSON (default: <checkpoint stem>.eval.json beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-eval fit-features", description="Train the domain classifier on real "
                                "shards; its penultimate layer serves as the feature network.")
    p.add_argument("--data", required=True, help="'digits', a gan-shards folder, or a data config .yaml")
    p.add_argument("--out", required=True, help="file to write (load with torch.load(weights_only=True))")
    p.add_argument("--resolution", type=int, help="for 'digits' (default 32)")
    p.add_argument("--cache-dir", default=os.environ.get("GAN_PIPELINE_CACHE", DEFAULT_CACHE))
    p.add_argument("--epochs", type=int, default=fit.EPOCHS, help=f"default {fit.EPOCHS}")
    p.add_argument("--width", type=int, default=fit.WIDTH, help="channels of the first stage; features are 4x this")
    p.add_argument("--batch-size", type=int, default=fit.BATCH_SIZE)
    p.add_argument("--lr", type=float, default=fit.LR, help="peak of the one-cycle schedule")
    p.add_argument("--holdout", type=float, default=fit.HOLDOUT, help="fraction held out for the accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, help="train on the first N images only")
    p.add_argument("--no-progress", action="store_true")
    return p


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')}={value} must be at least 1")


def _data_source(data: str, resolution: int | None) -> tuple[str, int]:
    """--data as 'digits', a shard folder, or a data config file (its source and resolution)."""
    if data.endswith((".yaml", ".yml")):
        if not Path(data).is_file():
            raise EvalError(f"--data {data} does not exist")
        node = OmegaConf.load(data)
        source = node.get("source") if not OmegaConf.is_missing(node, "source") else None
        if not isinstance(source, str) or "${" in source:
            raise EvalError(f"--data {data}: its `source` is not set to a plain value; pass the shard folder instead")
        return source, resolution or int(node.get("resolution", 32))
    return data, resolution or 32


def fit_main(argv: list[str]) -> int:
    args = _fit_parser().parse_args(argv)
    _positive(args, "epochs", "width", "batch_size", "max_samples", "resolution")
    source, resolution = _data_source(args.data, args.resolution)
    shard_dir, _ = find_shards(source, args.cache_dir, resolution)
    record = fit.fit_domain_net(shard_dir, args.out, epochs=args.epochs, width=args.width,
                                batch_size=args.batch_size, lr=args.lr, holdout=args.holdout, seed=args.seed,
                                max_samples=args.max_samples, progress=not args.no_progress)
    print(json.dumps({"out": args.out, "id": record["id"], "heldout_accuracy": record["heldout_accuracy"],
                      **{k: record["dataset"][k] for k in ("num_train", "num_heldout", "checksum")},
                      "seconds": record["training"]["seconds"]}))
    return 0


def _default_metrics(conditional: bool, has_logits: bool) -> list[str]:
    """fid,kid,pr; plus intra_fid for a conditional G, and accuracy when the feature network is a classifier."""
    return ["fid", "kid", "pr"] + ["intra_fid"] * conditional + ["accuracy"] * (conditional and has_logits)


def real_data(args: argparse.Namespace, ckpt: dict[str, Any], G: torch.nn.Module) -> tuple[Any, dict, str]:
    """(shard folder, manifest, cache dir) of the data G was trained on, or of --data; checked against G."""
    data_cfg, paths = ckpt["config"].get("data", {}), ckpt["config"].get("paths", {})
    cache_dir = args.cache_dir or os.environ.get("GAN_PIPELINE_CACHE") or paths.get("cache_dir") or DEFAULT_CACHE
    source = args.data or data_cfg.get("source", "digits")
    shard_dir, manifest = find_shards(source, cache_dir, int(data_cfg.get("resolution", 32)))
    if (manifest["resolution"], manifest["channels"]) != (G.resolution, G.channels):
        raise EvalError(f"--data {source}: images are {manifest['channels']}x{manifest['resolution']}px but the "
                        f"generator makes {G.channels}x{G.resolution}px; give the data it was trained on")
    if G.num_classes > 0 and manifest["num_classes"] != G.num_classes:
        raise EvalError(f"--data {source} has {manifest['num_classes']} classes but the generator {G.num_classes}")
    return shard_dir, manifest, cache_dir


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    _positive(args, "num_samples", "batch_size", "max_real", "k", "kid_subsets")
    if args.truncation is not None and args.truncation <= 0:
        raise EvalError(f"--truncation={args.truncation} must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: no CUDA device here; use --device cpu")
    metrics = parse_metrics(args.metrics) if args.metrics else None
    ckpt = read_checkpoint(args.checkpoint)
    G = build_generator(ckpt, use_g=args.use_g).to(args.device)
    if args.standing_stats < 0:
        raise EvalError(f"--standing-stats={args.standing_stats} must be >= 0 (0 turns it off)")
    if args.standing_stats:
        standing_statistics(G, num_batches=args.standing_stats, batch_size=args.batch_size, seed=args.seed,
                            truncation=args.truncation if truncation_mode(G) == "z_threshold" else None,
                            progress=not args.no_progress)
    shard_dir, manifest, cache_dir = real_data(args, ckpt, G)
    counts = class_counts(manifest) if G.num_classes > 0 else []
    progress = not args.no_progress
    net = resolve_feature_net(args.feature_net, manifest=manifest, shard_dir=shard_dir, cache_dir=cache_dir,
                              inception_sha256=args.inception_sha256, progress=progress).to(args.device)
    net.check_input(manifest["channels"], manifest["resolution"], f"--data {args.data}" if args.data else
                    "the checkpoint's data")
    metrics = metrics or _default_metrics(G.num_classes > 0, net.has_logits)
    check_metrics(metrics, num_classes=G.num_classes, net=net, num_samples=args.num_samples,
                  class_counts=counts)  # before the (possibly long) real features
    ref = reference_features(net, manifest, shard_dir, cache_dir, max_samples=args.max_real,
                             batch_size=args.batch_size, device=args.device, progress=progress)
    result = evaluate(G, net, ref, metrics=metrics, num_samples=args.num_samples, class_counts=counts,
                      truncation=args.truncation, seed=args.seed, batch_size=args.batch_size, device=args.device,
                      k=args.k, kid_subsets=args.kid_subsets, generator="G" if args.use_g else "G_ema",
                      kimg=checkpoint_kimg(ckpt), progress=progress)
    result["protocol"]["standing_stats"] = ({"batches": args.standing_stats, "batch_size": args.batch_size}
                                            if args.standing_stats else None)
    return {"checkpoint": str(args.checkpoint), **result, "wall_seconds": round(time.perf_counter() - t0, 2)}


def eval_main(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    result = run_eval(args)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    try:
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise EvalError(f"--out {out}: cannot write the result ({e.strerror}); pass --out to a writable file") \
            from None
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message=r".*weights_only.*")
    try:
        return fit_main(argv[1:]) if argv[:1] == ["fit-features"] else eval_main(argv)
    except EvalError as e:
        print(f"gan-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
