"""Step time of per-class cBN statistics against pooled ones: prints one JSON line.

    python bench/cbn_cost.py [--pairs 5] [--steps 60] [--warmup 10] [more Hydra overrides]

Runs bench/train_throughput.py alternately with `model.generator.cbn_stats=pooled` and `per_class`
(both with grouped fake labels, `model.fake_labels.grouping=grouped`), `--pairs` times, so that the
drift of a shared machine's speed hits both alike, and reports every pair's seconds per D step, the
per-pair overheads and their median. Default: the BigGAN digits setting (`model=biggan`, the embedded
digits, batch 32).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().with_name("train_throughput.py")


def step_seconds(stats: str, args: argparse.Namespace, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(BENCH), "--steps", str(args.steps), "--warmup", str(args.warmup), "metrics=none",
           "model.fake_labels.grouping=grouped", f"model.generator.cbn_stats={stats}", *overrides]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args, overrides = parser.parse_known_args()
    pairs = []
    for _ in range(args.pairs):
        pooled, per_class = step_seconds("pooled", args, overrides), step_seconds("per_class", args, overrides)
        pairs.append({"pooled_s": pooled["seconds_per_d_step"], "per_class_s": per_class["seconds_per_d_step"],
                      "gemm_gflops": [pooled["fp32_gemm_gflops"], per_class["fp32_gemm_gflops"]]})
    overheads = [p["per_class_s"] / p["pooled_s"] - 1 for p in pairs]
    print(json.dumps({"bench": "cbn_cost", "overrides": overrides, "steps": args.steps, "pairs": pairs,
                      "overhead_per_pair": [round(o, 4) for o in overheads],
                      "overhead_median": round(statistics.median(overheads), 4),
                      "overhead_mean": round(statistics.fmean(overheads), 4)}))


if __name__ == "__main__":
    main()
