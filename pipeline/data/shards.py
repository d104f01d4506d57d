"""Write image datasets as byte-reproducible webdataset shards (the gan-shards CLI), check them, read them back."""

import argparse
import fcntl
import hashlib
import io
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data import sources, storage
from pipeline.data.digits import CLASS_NAMES as DIGIT_CLASSES
from pipeline.data.digits import load_digits
from pipeline.data.storage import DatasetError
from pipeline.data.stream import samples_of

__all__ = ["DatasetError", "MANIFEST", "ensure_shards", "iterate_shards", "main", "read_manifest", "write_shards"]

FORMAT_VERSION = 1
ORDER_SEED = 0  # folder and ZIP sources are written as sorted names permuted with this seed
MANIFEST = "manifest.json"
IMAGE_FORMATS = ("png", "jpg")  # also the tar key of the image; a manifest without image_format is png
FITS = ("crop", "pad")
_SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
_REQUIRED_KEYS = ("format_version", "shards", "num_samples", "classes", "num_classes", "resolution", "channels", "mode")


# --- writing --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    """write_shards' choices, checked once; each error names the flag that fixes it."""

    resolution: int | None
    shard_size: int
    skip_bad: bool
    mode: str | None
    progress: bool
    labels: str | None
    unlabelled: str
    workers: int
    fit: str
    image_format: str
    quality: int

    def check(self) -> None:
        if self.shard_size < 1 or (self.resolution is not None and self.resolution < 1):
            raise DatasetError("--shard-size and --resolution must be positive")
        if self.mode not in (None, "L", "RGB"):
            raise DatasetError(f"--mode must be L or RGB, got {self.mode}")
        if self.workers < 1:
            raise DatasetError(f"--workers must be at least 1, got {self.workers}")
        if self.fit not in FITS or self.image_format not in IMAGE_FORMATS or self.unlabelled not in ("error", "skip"):
            raise DatasetError(f"--fit must be crop|pad, --format png|jpg and --unlabelled error|skip; got "
                               f"{self.fit}, {self.image_format}, {self.unlabelled}")
        if not 1 <= self.quality <= 100:
            raise DatasetError(f"--quality must be 1..100, got {self.quality}")


@dataclass
class _Plan:
    """What is about to be written: the (encoded image, label) stream and the facts the manifest records."""

    samples: Iterator[tuple[bytes, int]]
    total: int
    scan: sources.Scan
    mode: str
    resolution: int
    order: str


def _bad_image(scan: sources.Scan, name: str, why: str) -> DatasetError:
    return DatasetError(f"cannot read image {scan.files.describe(name)} ({why}); fix or remove it, "
                        "or pass --skip-bad to skip unreadable files")


def _bar(items: Iterable, total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(items, total=total, unit="img", desc=desc, disable=None if progress else True)


def _readable(scan: sources.Scan, items: list, fn: Callable, opts: _Options,
              skipped: list[str]) -> Iterator[tuple[str, int, object]]:
    """(name, label, fn(files, name)) per item, in order whatever the number of workers; an unreadable file stops
    the run, or with --skip-bad is left out and recorded."""
    results = sources.map_items(partial(fn, scan.files), [name for name, _ in items], opts.workers)
    try:
        for (name, label), result in zip(items, results):
            if isinstance(result, str):
                if not opts.skip_bad:
                    raise _bad_image(scan, name, result)
                skipped.append(name)
            else:
                yield name, label, result
    finally:
        results.close()  # stops the pool now, not when the garbage collector gets to it


def _probe(scan: sources.Scan, opts: _Options, skipped: list[str]) -> tuple[list, set, set]:
    """Read every header once: drop (or fail on) unreadable files, collect grayness and sizes."""
    kept, grays, sizes = [], set(), set()
    readable = _readable(scan, scan.items, sources.probe_file, opts, skipped)
    for name, label, (gray, size) in _bar(readable, len(scan.items), "reading headers", opts.progress):
        grays.add(gray)
        sizes.add(size)
        kept.append((name, label))
    if not kept:
        raise DatasetError(f"none of the {len(scan.items)} images in {scan.files.root} could be read")
    return kept, grays, sizes


def _choose_mode(grays: set[bool], forced: str | None) -> str:
    if forced is not None:
        return forced
    if len(grays) > 1:
        raise DatasetError("mixed modes: some images are grayscale and some colour; use --mode L|RGB to convert all")
    return "L" if grays == {True} else "RGB"


def _choose_resolution(sizes: set[tuple[int, int]], resolution: int | None) -> int:
    if resolution is not None:
        return resolution
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise DatasetError(f"images have different sizes ({listed}, ...); pass --resolution R to resize them all")
    (w, h), = sizes
    if w != h:
        raise DatasetError(f"images are {w}x{h}, not square; pass --resolution R to make them square "
                           "(--fit crop: center crop, --fit pad: black bars) and resize")
    return w


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finish_shard(writer: wds.TarWriter, folder: Path, record: dict, done: Callable[[Path], None]) -> None:
    writer.close()
    record["sha256"] = _sha256(folder / record["name"])
    done(folder / record["name"])


def _write_tars(samples: Iterable, folder: Path, shard_size: int, total: int, image_key: str, progress: bool,
                done: Callable[[Path], None]) -> tuple[list, Counter]:
    """Write samples into shard-%06d.tar files of `shard_size` samples each, calling `done` on each finished
    file; return shard records and label counts."""
    shards, counts, writer = [], Counter(), None
    for index, (data, label) in enumerate(_bar(samples, total, "gan-shards", progress)):
        if index % shard_size == 0:
            if writer is not None:
                _finish_shard(writer, folder, shards[-1], done)
            shards.append({"name": f"shard-{len(shards):06d}.tar", "num_samples": 0})
            # mtime=0 makes the tar headers independent of when we ran, so shards are byte-reproducible.
            writer = wds.TarWriter(str(folder / shards[-1]["name"]), encoder=False, mtime=0)
        writer.write({"__key__": f"{index:08d}", image_key: data, "cls": str(label).encode()})
        shards[-1]["num_samples"] += 1
        counts[label] += 1
    if writer is not None:
        _finish_shard(writer, folder, shards[-1], done)
    return shards, counts


def _check_not_inside(out_dir: str | Path, source: str) -> None:
    out = storage.local_path(out_dir)
    if out is not None and source != "digits" and out.resolve().is_relative_to(Path(source).resolve()):
        raise DatasetError(f"OUT_DIR {out} must not be inside SOURCE {source}")


def _plan_digits(opts: _Options) -> _Plan:
    if opts.labels is not None:
        raise DatasetError("--labels works with a folder SOURCE, not digits")
    resolution, mode = opts.resolution or 32, opts.mode or "L"
    images, ys = load_digits(resolution)
    samples = ((sources.encode_image(Image.fromarray(a).convert(mode), opts.image_format, opts.quality), int(y))
               for a, y in zip(images, ys))
    scan = sources.Scan(None, [], {name: i for i, name in enumerate(DIGIT_CLASSES)})
    return _Plan(samples, len(images), scan, mode, resolution, "load_digits order")


def _plan_source(source: str, opts: _Options, skipped: list[str]) -> _Plan:
    scan = sources.scan_source(source, opts.labels, opts.unlabelled)
    # Sorted names would give each class its own shards, which a shuffle buffer smaller than a shard cannot mix
    # back; a fixed permutation keeps the output reproducible and every shard a class mix.
    scan.items = [scan.items[i] for i in np.random.default_rng(ORDER_SEED).permutation(len(scan.items))]
    items, grays, sizes = _probe(scan, opts, skipped)
    mode, resolution = _choose_mode(grays, opts.mode), _choose_resolution(sizes, opts.resolution)
    encode = partial(sources.encode_file, encoding=sources.Encoding(mode, resolution, opts.fit, opts.image_format,
                                                                    opts.quality))
    samples = ((data, label) for _, label, data in _readable(scan, items, encode, opts, skipped))
    return _Plan(samples, len(items), scan, mode, resolution,
                 f"sorted names permuted by numpy default_rng({ORDER_SEED})")


def _manifest(source: str, plan: _Plan, shards: list[dict], counts: Counter, opts: _Options,
              skipped: list[str]) -> dict:
    if not shards:
        raise DatasetError(f"none of the images in {source} could be read")
    classes = plan.scan.classes
    if empty := [name for name, i in classes.items() if counts[i] == 0]:
        raise DatasetError(f"class {empty[0]} has no readable images left")
    return {
        "format_version": FORMAT_VERSION, "source": source, "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards), "classes": classes, "num_classes": len(classes),
        # Per-label counts let training draw fake labels from the data's class distribution.
        "class_counts": {str(i): counts[i] for i in range(len(classes))},
        "resolution": plan.resolution, "channels": 1 if plan.mode == "L" else 3, "mode": plan.mode,
        "image_format": opts.image_format, "quality": opts.quality if opts.image_format == "jpg" else None,
        "fit": opts.fit, "labels_file": plan.scan.labels_file, "num_unlabelled": plan.scan.num_unlabelled,
        "order": plan.order, "skipped": sorted(skipped), "num_skipped": len(skipped),
    }


def write_shards(source: str, out_dir: str | Path, *, resolution: int | None = None, shard_size: int = 1000,
                 skip_bad: bool = False, mode: str | None = None, overwrite: bool = False, progress: bool = True,
                 labels: str | Path | None = None, unlabelled: str = "error", workers: int = 1, fit: str = "crop",
                 image_format: str = "png", quality: int = 95) -> dict:
    """Write `source` ('digits', an image folder, a folder plus `labels` file, or a StyleGAN .zip) as shards plus
    manifest.json into a folder or fsspec URL; return the manifest."""
    opts = _Options(resolution, shard_size, skip_bad, mode, progress, None if labels is None else str(labels),
                    unlabelled, workers, fit, image_format, quality)
    opts.check()
    _check_not_inside(out_dir, str(source))
    output = storage.Publisher(out_dir, manifest=MANIFEST, ours=_SHARD_NAME, overwrite=overwrite)
    plan, skipped = None, []
    try:
        plan = _plan_digits(opts) if source == "digits" else _plan_source(str(source), opts, skipped)
        shards, counts = _write_tars(plan.samples, output.begin(), shard_size, plan.total, image_format, progress,
                                     output.file_done)
        manifest = _manifest(str(source), plan, shards, counts, opts, skipped)
        output.commit(json.dumps(manifest, indent=2) + "\n")  # the manifest goes last
    except BaseException:
        output.abort()
        raise
    finally:
        if plan is not None:
            plan.samples.close()  # stops a worker pool now, not when the garbage collector gets to it
        sources.close_archives()
    return manifest


# --- reading --------------------------------------------------------------------------------------------------

def dataset_root(location: str | Path) -> str:
    """The dataset folder, URL or pipe template of `location`, which may also name its manifest.json."""
    text = str(location)
    if storage.is_pipe(text) or not (text == MANIFEST or text.endswith("/" + MANIFEST)):
        return text
    return text[: -len(MANIFEST)].rstrip("/") or "."


def read_manifest(location: str | Path) -> dict:
    """Load and sanity-check manifest.json of a gan-shards dataset: a folder, the file itself, an fsspec URL or a
    `pipe:` template. Old manifests without image_format read as png."""
    root = dataset_root(location)
    where = storage.join(root, MANIFEST)
    try:
        raw = storage.read_bytes(root, MANIFEST)
    except FileNotFoundError:
        raise DatasetError(f"no {MANIFEST} in {root}; write the dataset with gan-shards first") from None
    except (OSError, ImportError, ValueError, subprocess.TimeoutExpired) as exn:
        raise DatasetError(f"cannot read {where} ({exn})") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise DatasetError(f"{where} is not valid JSON ({exn}); rewrite it with gan-shards --overwrite") from None
    if not isinstance(manifest, dict) or (missing := [k for k in _REQUIRED_KEYS if k not in manifest]):
        raise DatasetError(f"{where} is not a gan-shards manifest (missing {missing or 'everything'})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{where} has format_version {manifest['format_version']}, expected {FORMAT_VERSION}")
    manifest.setdefault("image_format", "png")  # written before jpg existed
    if manifest["image_format"] not in IMAGE_FORMATS:
        raise DatasetError(f"{where} has image_format {manifest['image_format']!r}; this version reads png and jpg")
    return manifest


def _is_complete(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
    except DatasetError:
        return False
    return all((folder / s["name"]).is_file() for s in manifest["shards"])


def ensure_shards(source: str, cache_dir: str | Path, *, resolution: int) -> Path:
    """Return the shard folder for `source`, writing the digits shards into `cache_dir` on first use."""
    if source == "digits":
        target = Path(cache_dir) / f"digits-{resolution}"
        if _is_complete(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".digits-{resolution}.lock", "w") as lock:
            # DDP ranks all land here at once: one writes, the others wait and then find the manifest.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _is_complete(target):
                write_shards("digits", target, resolution=resolution, overwrite=True, progress=False)
        return target
    if (Path(source) / MANIFEST).is_file():
        return Path(source)
    raise ValueError(f"data.source must be 'digits' or a directory written by gan-shards (with {MANIFEST}); "
                     f"got {source!r}. For a folder of images run: gan-shards {source} OUT_DIR")


def iterate_shards(location: str | Path) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield (key, uint8 image (H, W) or (H, W, 3), label) from a dataset (folder, URL or pipe) in written order."""
    root, manifest = dataset_root(location), read_manifest(location)
    keys = (manifest["image_format"], *IMAGE_FORMATS)
    for shard in manifest["shards"]:
        with storage.open_file(root, shard["name"]) as stream:
            for sample in samples_of(stream, shard["name"]):
                data = next((sample[k] for k in keys if k in sample), None)
                if data is None or "cls" not in sample:
                    raise DatasetError(f"sample {sample['__key__']} in {shard['name']} has no image or label; "
                                       f"check the dataset with: gan-shards verify {root}")
                with Image.open(io.BytesIO(data)) as im:
                    yield sample["__key__"], np.array(im), int(sample["cls"])


# --- command line ---------------------------------------------------------------------------------------------

_USAGE = "gan-shards SOURCE OUT_DIR [options]\n       gan-shards verify DIR_OR_URL"
_EPILOG = """examples:
  gan-shards /data/flowers /data/flowers-shards --resolution 64        # one sub-folder per class
  gan-shards /data/photos  s3://bucket/photos --labels labels.csv --workers 8 --format jpg
  gan-shards ffhq.zip /data/ffhq-shards --fit pad                       # a dataset_tool.py ZIP
  gan-shards verify s3://bucket/photos                                  # exit 1 if a shard is bad"""


def _write_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-shards", usage=_USAGE, description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="'digits', a folder of class folders or of images, or a "
                   "StyleGAN dataset .zip (labels from its dataset.json)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder or fsspec URL (s3://, gs://, ...) to write into")
    p.add_argument("--labels", metavar="FILE", help="CSV (filename,label rows) or JSON ({filename: label} or "
                   "[[filename, label], ...]) labelling the images of a SOURCE folder; names relative to SOURCE")
    p.add_argument("--unlabelled", choices=["error", "skip"], default="error",
                   help="images missing from --labels or dataset.json: stop (default) or leave them out")
    p.add_argument("--resolution", type=int, metavar="R",
                   help="make square (see --fit) and resize to R x R (digits: 32)")
    p.add_argument("--fit", choices=FITS, default="crop",
                   help="non-square images: center-crop (default) or pad with black bars to square")
    p.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="png",
                   help="png (lossless, default) or jpg")
    p.add_argument("--quality", type=int, default=95, metavar="Q",
                   help="JPEG quality 1..100 for --format jpg (default 95)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes decoding and encoding images (default 1); the output is identical for any number")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them in the manifest")
    p.add_argument("--mode", choices=["L", "RGB"], help="convert every image to this mode")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT_DIR written by gan-shards")
    return p


def _verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gan-shards verify", description="Check that every shard of a gan-shards "
                                "dataset exists and matches its manifest (sha256, sample count). Exit 0 if all "
                                "are good, 1 if any is bad, 2 if the manifest cannot be read.")
    p.add_argument("location", metavar="DIR_OR_URL", help="dataset folder, its manifest.json, a URL or pipe:")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.location)
        from pipeline.data.verify import verify_shards  # it reads with this module's read_manifest

        problems = verify_shards(args.location, progress=True)
    except (DatasetError, OSError) as exn:
        print(f"gan-shards verify: error: {exn}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    n, bad = len(manifest["shards"]), sum(not line.startswith(MANIFEST) for line in problems)
    summary = f"{bad} of {n} shards bad" if bad else f"all {n} shards good"
    summary += f", {MANIFEST} inconsistent" if bad < len(problems) else ""
    print(f"{args.location}: {summary} ({manifest['num_samples']} samples in the manifest)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """gan-shards SOURCE OUT_DIR | gan-shards verify DIR_OR_URL; exit 2 with one line on stderr on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:  # a SOURCE folder really named verify can be given as ./verify
        return _verify_main(argv[1:])
    args = _write_parser().parse_args(argv)
    try:
        m = write_shards(args.source, args.out_dir, resolution=args.resolution, shard_size=args.shard_size,
                         skip_bad=args.skip_bad, mode=args.mode, overwrite=args.overwrite, labels=args.labels,
                         unlabelled=args.unlabelled, workers=args.workers, fit=args.fit,
                         image_format=args.image_format, quality=args.quality)
    except (DatasetError, OSError) as exn:
        print(f"gan-shards: error: {exn}", file=sys.stderr)
        return 2
    skipped = f", skipped {m['num_skipped']} unreadable" if m["num_skipped"] else ""
    unlabelled = f", left out {m['num_unlabelled']} unlabelled" if m["num_unlabelled"] else ""
    jpg = f", jpg q{m['quality']}" if m["image_format"] == "jpg" else ""
    print(f"wrote {m['num_samples']} images ({m['num_classes']} classes, {m['resolution']}x{m['resolution']} "
          f"{m['mode']}{jpg}) in {len(m['shards'])} shards to {args.out_dir}{skipped}{unlabelled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
