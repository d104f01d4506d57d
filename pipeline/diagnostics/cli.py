"""`gan-diagnose`: weight spectra, image spectra, training-dynamics eigenvalues, PPL and noise statistics of a
checkpoint, as one JSON record and PNG plots.

    gan-diagnose CHECKPOINT [--what weights,output_spectrum,eig,ppl,noise] [--out DIR] [--num-samples N]
                            [--data SOURCE] [--feature-net PATH] [--eig-iters K] [--use-g]

Writes DIR/diagnostics.json and DIR/<what>.png (ppl: numbers only). Bad input exits with code 2 and one line
that names the argument. The diagnostic functions below are shared with the training callback (callback.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.diagnostics.dynamics import FixedBatch
from pipeline.diagnostics.plots import PLOTS
from pipeline.diagnostics.ppl import feature_fn_from_net, ppl
from pipeline.diagnostics.report import (
    DEFAULT_WHAT,
    WHAT,
    eig_report,
    generate,
    noise_report,
    output_spectrum_report,
    parse_what,
    scalars,
    weights_report,
)
from pipeline.losses.adversarial import LOSSES, get_loss
from pipeline.metrics.checkpoint import (
    build_discriminator,
    build_generator,
    build_network,
    checkpoint_kimg,
    read_checkpoint,
)
from pipeline.metrics.cli import real_data
from pipeline.metrics.errors import EvalError
from pipeline.metrics.features import resolve_feature_net
from pipeline.metrics.real_data import real_batches


# ---- the command ------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-diagnose", description="Diagnostics of a gan-train checkpoint: JSON + PNGs.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by gan-train")
    p.add_argument("--what", default=",".join(DEFAULT_WHAT),
                   help=f"comma-separated, from {','.join(WHAT)} (default: {','.join(DEFAULT_WHAT)})")
    p.add_argument("--out", help="output folder (default: <checkpoint stem>.diagnostics/ beside it)")
    p.add_argument("--num-samples", type=int, default=500, help="generated and real images (default 500)")
    p.add_argument("--data", help="real data: 'digits' or a gan-shards folder (default: the checkpoint's data.source)")
    p.add_argument("--cache-dir", help="digits shards and the digits feature net (default: $GAN_PIPELINE_CACHE, "
                   "else the checkpoint's paths.cache_dir)")
    p.add_argument("--feature-net", help="ppl's distance: as gan-eval's --feature-net (default: the digits domain "
                   "net, InceptionV3 otherwise)")
    p.add_argument("--eig-iters", type=int, default=10, help="Arnoldi steps, one Jacobian-vector product each (10)")
    p.add_argument("--eig-batch", type=int, default=16, help="real images and latents in the eig step (16)")
    p.add_argument("--ar-order", type=int, default=1, help="order of the noise AR fit (default 1)")
    p.add_argument("--use-g", action="store_true", help="images from G instead of G_ema (eig always uses G)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> list[str]:
    what = parse_what(args.what)
    for name in ("num_samples", "eig_iters", "eig_batch", "ar_order", "batch_size"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: no CUDA device here; use --device cpu")
    return what


def _training_setup(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Loss, lrs and R1 gamma of the checkpoint's run (config.model.objective / g_opt / d_opt)."""
    model = ckpt["config"].get("model", {})
    objective = model.get("objective", {})
    loss = objective.get("loss", "hinge")
    if loss not in LOSSES:
        raise EvalError(f"CHECKPOINT: config.model.objective.loss={loss!r} is not one of {sorted(LOSSES)}")
    lrs = [model.get(f"{n}_opt", {}).get("lr") for n in ("g", "d")]
    if any(not isinstance(lr, (int, float)) for lr in lrs):
        raise EvalError("--what eig: the checkpoint's config.model.g_opt.lr / d_opt.lr are not set")
    d_loss, g_loss = get_loss(loss)
    return {"d_loss": d_loss, "g_loss": g_loss, "lr_g": float(lrs[0]), "lr_d": float(lrs[1]),
            "r1_gamma": float(objective.get("r1_gamma", 0.0))}


def _eig(args: argparse.Namespace, ckpt: dict[str, Any], D: nn.Module, real: Tensor, real_y: Tensor) -> dict:
    """eig on the training G (not G_ema) and D, in training mode, at the checkpoint's stage."""
    G = build_network(ckpt, "generator", prefix="G.", hint=" for --what eig").to(args.device).train()
    D = D.train()
    x, y = real[:args.eig_batch].to(args.device), real_y[:args.eig_batch].to(args.device)
    growth = ckpt.get("growth")
    if growth and hasattr(G, "set_growth"):  # train at the stage's resolution, as the training step does
        G.set_growth(growth["resolution"], growth["alpha"])
        if x.shape[-1] != growth["resolution"]:
            x = D.resize(x, growth["resolution"])
    z = torch.randn(len(x), G.z_dim, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    yc = y if G.num_classes > 0 else None
    batch = FixedBatch(x_real=x, z=z, y_real=yc, y_fake=yc)
    try:
        return {**eig_report(G, D, batch, iters=args.eig_iters, seed=args.seed, **_training_setup(ckpt)),
                "generator": "G"}
    finally:
        D.eval()


def run_diagnose(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    what = _check_args(args)
    ckpt = read_checkpoint(args.checkpoint)
    G = build_generator(ckpt, use_g=args.use_g).to(args.device)
    D = build_discriminator(ckpt).to(args.device) if {"weights", "eig"} & set(what) else None
    shard_dir, manifest, cache_dir = real_data(args, ckpt, G)
    real, real_y = map(torch.cat, zip(*real_batches(shard_dir, args.batch_size, max_samples=args.num_samples)))
    fake = generate(G, args.num_samples, batch_size=args.batch_size, seed=args.seed, device=args.device)
    net = None
    if "ppl" in what:  # before the slow diagnostics: a missing feature network fails now
        net = resolve_feature_net(args.feature_net, manifest=manifest, shard_dir=shard_dir, cache_dir=cache_dir,
                                  progress=not args.no_progress).to(args.device)
        net.check_input(manifest["channels"], manifest["resolution"],
                        "--data" if args.data else "the checkpoint's data")
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".diagnostics")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    reports: dict[str, Any] = {}
    for w in tqdm(what, desc="gan-diagnose", disable=args.no_progress):
        if w == "weights":
            reports[w] = weights_report(G, D)
        elif w == "output_spectrum":
            reports[w] = output_spectrum_report(fake, real)
        elif w == "noise":
            reports[w] = noise_report(fake, real, order=args.ar_order)
        elif w == "eig":
            reports[w] = _eig(args, ckpt, D, real, real_y)
        elif w == "ppl":
            spaces = ["z", "w"] if hasattr(G, "mapping") else ["z"]
            reports[w] = {s: ppl(G, space=s, feature_fn=feature_fn_from_net(net), num_samples=args.num_samples,
                                 batch_size=args.batch_size, generator=torch.Generator(args.device).manual_seed(
                                     args.seed)) for s in spaces}
        if w in PLOTS:
            PLOTS[w](reports[w], out_dir / f"{w}.png")
    return {"checkpoint": str(args.checkpoint), "kimg": checkpoint_kimg(ckpt),
            "generator": "G" if args.use_g else "G_ema", "num_samples": args.num_samples, "seed": args.seed,
            "summary": scalars(reports), "reports": reports, "out": str(out_dir),
            "wall_seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message=r".*weights_only.*")
    try:
        args = _parser().parse_args(argv)
        record = run_diagnose(args)
        path = Path(record["out"]) / "diagnostics.json"
        try:
            path.write_text(json.dumps(record, indent=1) + "\n")
        except OSError as e:
            raise EvalError(f"--out {path.parent}: cannot write diagnostics.json ({e.strerror})") from None
    except EvalError as e:
        print(f"gan-diagnose: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": record["out"], "kimg": record["kimg"], **record["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
