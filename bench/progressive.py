"""Progressive growing against a fixed resolution for the same budget: prints one JSON line.

    python bench/progressive.py                       # BigGAN on the digits, 50 kimg: 8 -> 16 -> 32 vs fixed 32
    python bench/progressive.py --kimg 50 --seeds 0 1 model=stylegan2 [more Hydra overrides for both runs]
    python bench/progressive.py --progressive schedule.stage_kimg=10 --progressive schedule.fade_kimg=5

Each run is a separate `gan-train` process (W&B off) with the same seed, data and length; the only difference
is `schedule=progressive` (conf/schedule/progressive.yaml unless overridden with --progressive ...). Metrics
(FID, intra-FID, accuracy on the digits' domain network, 2,000 samples of G_ema at 32x32) are taken at the end
of each run; time per kimg comes from each stage's wall time in summary.json (the end-of-run evaluation is not
in it). With several seeds the figures are per seed and their mean.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, name: str, overrides: list[str]) -> dict:
    """One gan-train run; returns its summary.json with the final metrics and the stages."""
    cmd = [sys.executable, "-m", "pipeline.train", f"paths.output_dir={out}", f"run.name={name}", "~logger",
           "metrics.every_kimg=100000", "train.sample_every_kimg=100000", *overrides]
    env = {**os.environ, "WANDB_SILENT": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/progressive.py: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    summary["process_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def figures(summary: dict) -> dict:
    metrics = summary["metrics"]["metrics"]
    stages = summary["stages"]
    train_seconds = sum(s["seconds"] for s in stages)
    return {"fid": round(metrics["fid"], 3), "intra_fid": round(metrics["intra_fid"], 3),
            "accuracy": round(metrics["accuracy"], 4), "train_seconds": round(train_seconds, 1),
            "s_per_kimg": round(train_seconds / summary["kimg"], 3),
            "stages": [{k: s[k] for k in ("resolution", "from_kimg", "to_kimg", "s_per_kimg")} for s in stages]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kimg", type=float, default=50.0, help="length of both runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--progressive", action="append", default=[], metavar="OVERRIDE",
                        help="an override for the progressive run only (repeat it), e.g. --progressive "
                        "schedule.stage_kimg=10 --progressive schedule.fade_kimg=5")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--runs", choices=["both", "fixed", "progressive"], default="both",
                        help="which of the two to run (to add another progressive schedule to earlier figures)")
    args, overrides = parser.parse_known_args()
    common = [f"train.kimg={args.kimg}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        runs: dict[str, list[dict]] = {k: [] for k in ("fixed", "progressive") if args.runs in (k, "both")}
        for seed in args.seeds:
            if "fixed" in runs:
                runs["fixed"].append(figures(train(out, f"fixed-s{seed}", common + [f"seed={seed}"])))
            if "progressive" in runs:
                runs["progressive"].append(figures(train(out, f"progressive-s{seed}", common + [
                    f"seed={seed}", "schedule=progressive", *args.progressive])))
    result = {"bench": "progressive", "kimg": args.kimg, "seeds": args.seeds, "overrides": overrides,
              "progressive_overrides": args.progressive, "cpu_count": os.cpu_count()}
    for kind, per_seed in runs.items():
        mean = {k: round(statistics.mean(r[k] for r in per_seed), 3)
                for k in ("fid", "intra_fid", "accuracy", "train_seconds", "s_per_kimg")}
        result[kind] = {**mean, "per_seed": per_seed}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
