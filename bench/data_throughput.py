"""Data loading throughput: samples/s from shards against plain PIL decoding, and training fed by the loader
against training fed from memory. Prints one JSON line.

    python bench/data_throughput.py                     # 32x32 PNG and 256x256 JPEG, 0/1/2 workers, + training
    python bench/data_throughput.py --skip-train --batches 100

Two synthetic photo-like datasets (smooth random colour fields plus pixel noise, 10 classes) are written with
gan-shards: 32x32 PNG and 256x256 JPEG (quality 95). For each:
- `pil_decode_per_s`: one core decoding the same encoded images from memory (PIL open + numpy array), the
  ceiling a loader can approach per core;
- `loader_per_s[w]`: ShardDataModule with w workers (batches of 64, after a warm-up), what training gets;
- `webdataset_per_s`: a plain webdataset pipeline (WebDataset -> decode("rgb8") -> batched, 2 workers) on
  the same shards, for reference;
- `loader_vs_pil`: loader_per_s with 2 workers / pil_decode_per_s (the issue's target: at least 0.8).
Training (`train`): the default BigGAN config on the 32x32 shards for --train-kimg, fed by the real loader
(data.num_workers=1 and 2) and by batches held in memory (the same images, decoded once): images/s of the
training loop from its first batch on (summary.json's stage s/kimg; `images_per_s` also counts the start-up
of the loader's workers). The loader is not the bottleneck when the two are equal.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.datamodule import ShardDataModule  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.stream import samples_of  # noqa: E402

BATCH = 64


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field with pixel noise: compresses and decodes like a small photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def make_dataset(root: Path, size: int, count: int, image_format: str) -> Path:
    src, out = root / f"src{size}", root / f"shards{size}{image_format}"
    rng = np.random.default_rng(size)
    for i in range(count):
        folder = src / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(rng, size).save(folder / f"{i:06d}.png")
    write_shards(str(src), out, shard_size=1000, image_format=image_format, quality=95, workers=2, progress=False)
    return out


def encoded_images(shards: Path, limit: int) -> list[bytes]:
    images = []
    for shard in sorted(shards.glob("shard-*.tar")):
        with open(shard, "rb") as f:
            images += [s.get("png", s.get("jpg")) for s in samples_of(f, str(shard))]
        if len(images) >= limit:
            break
    return images[:limit]


def pil_rate(images: list[bytes], seconds: float = 3.0) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                np.asarray(im)
        done += len(images)
    return done / (time.perf_counter() - t0)


def rate(batches, n: int, warmup: int = 10, repeats: int = 3) -> float:
    """Samples/s over n batches after a warm-up (workers start, shuffle buffers fill): the median of `repeats`."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        rates.append(n * BATCH / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def loader_rate(shards: Path, size: int, workers: int, n: int) -> float:
    dm = ShardDataModule(name="bench", source=str(shards), cache_dir="unused", resolution=size, channels=3,
                         num_classes=10, batch_size=BATCH, num_workers=workers, batches_per_epoch=10**9)
    dm.setup("fit")
    try:
        return rate(dm.train_dataloader(), n)
    finally:
        dm.teardown()


def webdataset_rate(shards: Path, workers: int, n: int) -> float:
    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    pipeline = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None).shuffle(1000)
                .decode("rgb8").to_tuple("png;jpg", "cls").batched(BATCH))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    return rate(loader, n)


class PreloadedDataModule(ShardDataModule):
    """The same data module, but its batches come from images decoded once into memory (the bench's control)."""

    def train_dataloader(self):
        batches = list(itertools.islice(super().train_dataloader(), 32))  # 32 real batches, then cycled
        self.teardown()

        class Held(torch.utils.data.IterableDataset):
            def __init__(self, n: int) -> None:
                self.n = n

            def __iter__(self):
                return itertools.islice(itertools.cycle(batches), self.n)

            def __len__(self) -> int:
                return self.n

        return torch.utils.data.DataLoader(Held(self.batches_per_epoch), batch_size=None, num_workers=0)


def train_rate(shards: Path, out: Path, name: str, kimg: float, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipeline.train", f"paths.output_dir={out}", f"run.name={name}", "~logger",
           "metrics=none", "train.sample_every_kimg=100000", f"train.kimg={kimg}", f"train.ckpt_every_kimg={kimg}",
           "data=folder", f"data.source={shards}", "data.resolution=32", "data.channels=3", "data.num_classes=10",
           "data.batch_size=32", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/data_throughput.py: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    # images_per_s counts from the start of fit (worker start-up included); the stage's s/kimg from the first batch.
    steady = 1000 / summary["stages"][0]["s_per_kimg"]
    return {"images_per_s": summary["images_per_s"], "steady_images_per_s": round(steady, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png-images", type=int, default=20000, help="32x32 PNG images to write")
    parser.add_argument("--jpg-images", type=int, default=4000, help="256x256 JPEG images to write")
    parser.add_argument("--batches", type=int, default=100, help="batches of 64 per timing (median of 3)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-kimg", type=float, default=5.0, help="length of each training run")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep the datasets and runs here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="data-throughput-"))
    root.mkdir(parents=True, exist_ok=True)
    result = {"bench": "data_throughput", "cpus": os.cpu_count(), "batch": BATCH, "torch": torch.__version__}
    cases = {"png32": (32, args.png_images, "png"), "jpg256": (256, args.jpg_images, "jpg")}
    shards = {}
    for case, (size, count, image_format) in cases.items():
        shards[case] = make_dataset(root, size, count, image_format)
        figures = {"images": count, "pil_decode_per_s": round(pil_rate(encoded_images(shards[case], 2000)))}
        n = args.batches  # shards are drawn with replacement: any number of batches
        figures["loader_per_s"] = {w: round(loader_rate(shards[case], size, w, n)) for w in args.workers}
        figures["webdataset_per_s"] = round(webdataset_rate(shards[case], 2, n))
        if 2 in figures["loader_per_s"]:
            figures["loader_vs_pil"] = round(figures["loader_per_s"][2] / figures["pil_decode_per_s"], 3)
        result[case] = figures
    if not args.skip_train:
        runs = root / "runs"
        result["train"] = {
            "config": "BigGAN default, data 32x32 PNG RGB, batch 32",
            "memory": train_rate(shards["png32"], runs, "memory", args.train_kimg,
                                 ["data._target_=bench.data_throughput.PreloadedDataModule", "data.num_workers=0"]),
            **{f"loader_{w}_workers": train_rate(shards["png32"], runs, f"loader{w}", args.train_kimg,
                                                 [f"data.num_workers={w}"]) for w in (1, 2)},
        }
        base = result["train"]["memory"]["steady_images_per_s"]
        for w in (1, 2):
            run = result["train"][f"loader_{w}_workers"]
            run["steady_vs_memory"] = round(run["steady_images_per_s"] / base, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
