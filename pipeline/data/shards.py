"""Write image datasets as byte-reproducible webdataset shards (the gan-shards CLI) and find them again."""

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.digits import CLASS_NAMES as DIGIT_CLASSES
from pipeline.data.digits import load_digits

FORMAT_VERSION = 1
ORDER_SEED = 0  # folder sources are written as sorted paths permuted with this seed
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_REQUIRED_KEYS = ("format_version", "shards", "num_samples", "classes", "num_classes", "resolution", "channels", "mode")
# Pillow's ways of saying "this file is not a readable image".
_BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A problem with the input images or the output folder that the user can fix."""


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files under `folder` in sorted order, skipping hidden files."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _scan_folder(root: Path) -> tuple[list[tuple[Path, int]], dict[str, int]]:
    """List (path, label) pairs and the class mapping of a class-folder or flat image folder."""
    if not root.is_dir():
        raise DatasetError(f"SOURCE must be 'digits' or a folder of images; {root} is not a folder")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DatasetError(f"{root} is empty")
    class_dirs = sorted((p for p in entries if p.is_dir()), key=lambda p: p.name)
    if not class_dirs:  # unconditional: every sample gets label 0 and the manifest says num_classes 0
        items = [(p, 0) for p in _image_files(root, recursive=False)]
        if not items:
            raise DatasetError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return items, {}
    if loose := _image_files(root, recursive=False):
        raise DatasetError(f"{root} has class folders and also loose images such as {loose[0].name}; "
                           "move every image into a class folder")
    classes = {d.name: i for i, d in enumerate(class_dirs)}
    items = []
    for d in class_dirs:
        files = _image_files(d, recursive=True)
        if not files:
            raise DatasetError(f"class folder {d} has no images")
        items += [(p, classes[d.name]) for p in files]
    return items, classes


def _bad_image(path: Path, root: Path, exn: Exception) -> DatasetError:
    return DatasetError(f"cannot read image {path.relative_to(root)} ({exn}); fix or remove it, "
                        "or pass --skip-bad to skip unreadable files")


def _is_gray(im: Image.Image) -> bool:
    """True for single-channel images, including palette images whose palette is all grays."""
    if im.mode in ("P", "PA"):
        pal = im.getpalette() or []
        return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
    return im.mode in ("1", "L", "LA", "F") or im.mode.startswith("I")


def _probe(items: list[tuple[Path, int]], root: Path, skip_bad: bool, skipped: list[str]) -> tuple[list, set, set]:
    """Read every header once: drop (or fail on) unreadable files, collect grayness and sizes."""
    kept, grays, sizes = [], set(), set()
    for path, label in items:
        try:
            with Image.open(path) as im:
                grays.add(_is_gray(im))
                sizes.add(im.size)
        except _BAD_IMAGE as exn:
            if not skip_bad:
                raise _bad_image(path, root, exn) from None
            skipped.append(str(path.relative_to(root)))
            continue
        kept.append((path, label))
    if not kept:
        raise DatasetError(f"none of the {len(items)} images in {root} could be read")
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
        raise DatasetError(f"images are {w}x{h}, not square; pass --resolution R to center-crop and resize")
    return w


def _convert(im: Image.Image, mode: str, resolution: int) -> Image.Image:
    """Convert to `mode`, center-crop to a square and resize to `resolution`."""
    if im.mode.startswith("I"):  # 16-bit grayscale: Pillow's convert() would clip at 255, so rescale
        im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if im.mode != mode:
        im = im.convert(mode)  # drops alpha; a palette becomes its colours
    w, h = im.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if side != resolution:
        # Lanczos is the sharpest anti-aliased filter for the usual case, downscaling photos.
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return im


def _folder_samples(items, root, mode, resolution, skip_bad, skipped) -> Iterator[tuple[Image.Image, int]]:
    """Decode, convert and resize each file; truncated files only show up here, on full decode."""
    for path, label in items:
        try:
            with Image.open(path) as im:
                im.load()
                out = _convert(im, mode, resolution)
        except _BAD_IMAGE as exn:
            if not skip_bad:
                raise _bad_image(path, root, exn) from None
            skipped.append(str(path.relative_to(root)))
            continue
        yield out, label


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # Pillow writes no timestamp chunk, so equal pixels give equal bytes
    return buf.getvalue()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_tars(samples: Iterable, folder: Path, shard_size: int, total: int, progress: bool) -> tuple[list, Counter]:
    """Write samples into shard-%06d.tar files of `shard_size` samples each; return shard records and label counts."""
    shards, counts, writer = [], Counter(), None
    bar = tqdm(samples, total=total, unit="img", desc="gan-shards", disable=None if progress else True)
    for index, (image, label) in enumerate(bar):
        if index % shard_size == 0:
            if writer is not None:
                writer.close()
            shards.append({"name": f"shard-{len(shards):06d}.tar", "num_samples": 0})
            # mtime=0 makes the tar headers independent of when we ran, so shards are byte-reproducible.
            writer = wds.TarWriter(str(folder / shards[-1]["name"]), encoder=False, mtime=0)
        writer.write({"__key__": f"{index:08d}", "png": _png(image), "cls": str(label).encode()})
        shards[-1]["num_samples"] += 1
        counts[label] += 1
    if writer is not None:
        writer.close()
    for shard in shards:
        shard["sha256"] = _sha256(folder / shard["name"])
    return shards, counts


def _check_out_dir(out: Path, source: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"OUT_DIR {out} exists and is not a folder")
    if source != "digits" and out.resolve().is_relative_to(Path(source).resolve()):
        raise DatasetError(f"OUT_DIR {out} must not be inside SOURCE {source}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"OUT_DIR {out} is not empty; pass --overwrite to replace it")
        if not (out / MANIFEST).exists():  # never rmtree a folder we did not write, whatever the flag says
            raise DatasetError(f"refusing to replace {out}: it is not empty and has no {MANIFEST} from gan-shards")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; a reader sees the old dataset or the new one, never half of one."""
    if out.is_dir() and any(out.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / out.name)
        os.rename(tmp, out)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, out)  # POSIX rename replaces an empty folder


def write_shards(source: str, out_dir: str | Path, *, resolution: int | None = None, shard_size: int = 1000,
                 skip_bad: bool = False, mode: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Write `source` ('digits' or an image folder) as PNG shards plus manifest.json; return the manifest."""
    if shard_size < 1 or (resolution is not None and resolution < 1):
        raise DatasetError("--shard-size and --resolution must be positive")
    if mode not in (None, "L", "RGB"):
        raise DatasetError(f"--mode must be L or RGB, got {mode}")
    out, skipped = Path(out_dir), []
    _check_out_dir(out, source, overwrite)
    if source == "digits":
        resolution = resolution or 32
        images, labels = load_digits(resolution)
        mode, classes = mode or "L", {name: i for i, name in enumerate(DIGIT_CLASSES)}
        samples = ((Image.fromarray(a).convert(mode), int(y)) for a, y in zip(images, labels))
        total, order = len(images), "load_digits order"
    else:
        root = Path(source)
        items, classes = _scan_folder(root)
        # Sorted paths would give each class its own shards, which a shuffle buffer smaller than a shard
        # cannot mix back; a fixed permutation keeps the output reproducible and every shard a class mix.
        items = [items[i] for i in np.random.default_rng(ORDER_SEED).permutation(len(items))]
        items, grays, sizes = _probe(items, root, skip_bad, skipped)
        mode, resolution = _choose_mode(grays, mode), _choose_resolution(sizes, resolution)
        samples, total = _folder_samples(items, root, mode, resolution, skip_bad, skipped), len(items)
        order = f"sorted paths permuted by numpy default_rng({ORDER_SEED})"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()  # not mkdtemp: its 0o700 would become the dataset's permissions
    try:
        shards, counts = _write_tars(samples, tmp, shard_size, total, progress)
        if not shards:
            raise DatasetError(f"none of the images in {source} could be read")
        if empty := [name for name, i in classes.items() if counts[i] == 0]:
            raise DatasetError(f"class {empty[0]} has no readable images left")
        manifest = {
            "format_version": FORMAT_VERSION, "source": str(source), "shards": shards,
            "num_samples": sum(s["num_samples"] for s in shards), "classes": classes, "num_classes": len(classes),
            # Per-label counts let training draw fake labels from the data's class distribution.
            "class_counts": {str(i): counts[i] for i in range(len(classes))},
            "resolution": resolution, "channels": 1 if mode == "L" else 3, "mode": mode,
            "order": order, "skipped": sorted(skipped), "num_skipped": len(skipped),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Load and sanity-check manifest.json from a gan-shards folder (or the file itself)."""
    path = Path(path)
    file = path if path.name == MANIFEST else path / MANIFEST
    if not file.is_file():
        raise DatasetError(f"no {MANIFEST} in {file.parent}; write the dataset with gan-shards first")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise DatasetError(f"{file} is not valid JSON ({exn}); rewrite it with gan-shards --overwrite") from None
    if not isinstance(manifest, dict) or (missing := [k for k in _REQUIRED_KEYS if k not in manifest]):
        raise DatasetError(f"{file} is not a gan-shards manifest (missing {missing or 'everything'})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{file} has format_version {manifest['format_version']}, expected {FORMAT_VERSION}")
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


def iterate_shards(path: str | Path) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield (key, uint8 image (H, W) or (H, W, 3), label) from a shard folder in written order."""
    urls = [str(Path(path) / s["name"]) for s in read_manifest(path)["shards"]]
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        with Image.open(io.BytesIO(sample["png"])) as im:
            yield sample["__key__"], np.array(im), int(sample["cls"])


def main(argv: list[str] | None = None) -> int:
    """gan-shards SOURCE OUT_DIR: write a dataset as shards; exit 2 with one line on stderr on bad input."""
    parser = argparse.ArgumentParser(prog="gan-shards", description=__doc__)
    parser.add_argument("source", metavar="SOURCE", help="'digits', a folder of class folders, or a folder of images")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write shard-*.tar and manifest.json into")
    parser.add_argument("--resolution", type=int, help="center-crop to square and resize to R x R (digits: 32)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them in the manifest")
    parser.add_argument("--mode", choices=["L", "RGB"], help="convert every image to this mode")
    parser.add_argument("--overwrite", action="store_true", help="replace an OUT_DIR written by gan-shards")
    args = parser.parse_args(argv)
    try:
        m = write_shards(args.source, args.out_dir, resolution=args.resolution, shard_size=args.shard_size,
                         skip_bad=args.skip_bad, mode=args.mode, overwrite=args.overwrite)
    except (DatasetError, OSError) as exn:
        print(f"gan-shards: error: {exn}", file=sys.stderr)
        return 2
    skipped = f", skipped {m['num_skipped']} unreadable" if m["num_skipped"] else ""
    print(f"wrote {m['num_samples']} images ({m['num_classes']} classes, {m['resolution']}x{m['resolution']} "
          f"{m['mode']}) in {len(m['shards'])} shards to {args.out_dir}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
