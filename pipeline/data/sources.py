"""Where gan-shards finds images and labels: class folders, a flat folder plus a labels file, a StyleGAN ZIP.

Every source becomes a sorted list of (name, label id) with names relative to its folder or archive, plus the
class mapping. `map_items` then probes or encodes the files, in a process pool when asked; the work functions
are module-level and take only a small `Files` and a name, so any multiprocessing start method can run them.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from pipeline.data.storage import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DATASET_JSON = "dataset.json"  # NVlabs dataset_tool.py's label file at the root of its ZIPs
# The ways of saying "this file is not a readable image": Pillow's, and a ZIP member's bad CRC or deflate stream.
BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, zipfile.BadZipFile, zlib.error)
_INTEGER = re.compile(r"[+-]?\d+")
_SHOWN = 3  # how many offending names an error message lists


@dataclass(frozen=True)
class Files:
    """The folder or ZIP archive that item names are relative to; small, so it pickles cheaply to workers."""

    root: str
    is_zip: bool = False

    def open(self, name: str) -> BinaryIO:
        if self.is_zip:
            return _archive(self.root).open(name)
        return open(Path(self.root) / name, "rb")

    def describe(self, name: str) -> str:
        return f"{name} in {self.root}" if self.is_zip else name


@dataclass
class Scan:
    """What a source holds: (name, label id) pairs sorted by name, and class name -> id ({} = unconditional)."""

    files: Files | None  # None for data that is already in memory (digits)
    items: list[tuple[str, int]]
    classes: dict[str, int]
    num_unlabelled: int = 0  # images left out by --unlabelled skip
    labels_file: str | None = None


# --- archives: one open ZipFile per process -------------------------------------------------------------------

_ARCHIVES: dict[tuple[int, str], zipfile.ZipFile] = {}


def _archive(path: str) -> zipfile.ZipFile:
    # Keyed by pid: a forked worker must not share the parent's file offset, so it opens its own handle.
    key = (os.getpid(), path)
    if key not in _ARCHIVES:
        _ARCHIVES[key] = zipfile.ZipFile(path)
    return _ARCHIVES[key]


def close_archives() -> None:
    """Close the ZIPs this process opened (workers' handles go with their processes)."""
    for key in [k for k in _ARCHIVES if k[0] == os.getpid()]:
        _ARCHIVES.pop(key).close()


# --- scanning ---------------------------------------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return posixpath.splitext(base)[1].lower() in IMAGE_SUFFIXES and not base.startswith(".")


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files under `folder` in sorted order, skipping hidden files."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and _is_image_name(p.name))


def scan_source(source: str, labels: str | None = None, unlabelled: str = "error") -> Scan:
    """Find the images and labels of a ZIP (SOURCE ending in .zip), a folder plus --labels, or a folder."""
    if source.lower().endswith(".zip"):
        if labels is not None:
            raise DatasetError(f"--labels works with a folder SOURCE; a ZIP carries its labels in {DATASET_JSON}")
        return _scan_zip(Path(source), unlabelled)
    root = Path(source)
    if not root.is_dir():
        raise DatasetError(f"SOURCE must be 'digits', a folder of images or a .zip; {root} is not a folder")
    if labels is not None:
        return _scan_labelled_folder(root, Path(labels), unlabelled)
    items, classes = _scan_class_folders(root)
    return Scan(Files(str(root)), items, classes)


def _scan_class_folders(root: Path) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """List (name, label) pairs and the class mapping of a class-folder or flat image folder."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DatasetError(f"{root} is empty")
    class_dirs = sorted((p for p in entries if p.is_dir()), key=lambda p: p.name)
    if not class_dirs:  # unconditional: every sample gets label 0 and the manifest says num_classes 0
        items = [(p.name, 0) for p in _image_files(root, recursive=False)]
        if not items:
            raise DatasetError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return items, {}
    if loose := _image_files(root, recursive=False):
        raise DatasetError(f"{root} has class folders and also loose images such as {loose[0].name}; "
                           "move every image into a class folder, or list them all in a --labels file")
    classes = {d.name: i for i, d in enumerate(class_dirs)}
    items = []
    for d in class_dirs:
        files = _image_files(d, recursive=True)
        if not files:
            raise DatasetError(f"class folder {d} has no images")
        items += [(p.relative_to(root).as_posix(), classes[d.name]) for p in files]
    return items, classes


def _scan_labelled_folder(root: Path, labels: Path, unlabelled: str) -> Scan:
    if not labels.is_file():
        raise DatasetError(f"--labels {labels} is not a file")
    rows = _read_labels_file(labels)
    present = {p.relative_to(root).as_posix() for p in _image_files(root, recursive=True)}
    items, classes, left_out = _match_labels(rows, present, lambda n: (root / n).is_file(), str(root), labels.name,
                                             unlabelled)
    return Scan(Files(str(root)), items, classes, left_out, str(labels))


def _scan_zip(path: Path, unlabelled: str) -> Scan:
    """Image members of a dataset_tool.py ZIP (any sub-folders) and the labels of its dataset.json, if any."""
    if not path.is_file():
        raise DatasetError(f"SOURCE {path} ends in .zip but is not a file")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {i.filename for i in zf.infolist() if not i.is_dir()}
            meta = zf.read(DATASET_JSON) if DATASET_JSON in members else None
    except (zipfile.BadZipFile, OSError) as exn:
        raise DatasetError(f"cannot read ZIP {path} ({exn}); check that it is a complete .zip file") from None
    images = sorted(n for n in members if _is_image_name(n) and not n.startswith("__MACOSX/"))
    if not images:
        raise DatasetError(f"no images found in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = _dataset_json_rows(meta, f"{path.name}:{DATASET_JSON}") if meta is not None else None
    if rows is None:  # no dataset.json, or {"labels": null}: unconditional
        return Scan(Files(str(path), is_zip=True), [(n, 0) for n in images], {})
    items, classes, left_out = _match_labels(rows, set(images), members.__contains__, str(path), DATASET_JSON,
                                             unlabelled)
    return Scan(Files(str(path), is_zip=True), items, classes, left_out, f"{path.name}:{DATASET_JSON}")


# --- labels files -----------------------------------------------------------------------------------------------
# A row is (file name, raw label, where) with `where` like "labels.csv line 4", for error messages.

def _read_labels_file(path: Path) -> list[tuple[str, object, str]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            raise DatasetError(f"--labels {path} is not valid JSON ({exn})") from None
        if isinstance(data, dict) and set(data) == {"labels"}:  # a dataset.json taken out of a StyleGAN ZIP
            data = data["labels"]
        if data is None:
            raise DatasetError(f"--labels {path} has no labels (null); leave out --labels for an unconditional set")
        return _json_rows(data, path.name)
    raise DatasetError(f"--labels {path} must be a .csv (filename,label rows) or .json file")


def _read_csv(path: Path) -> list[tuple[str, object, str]]:
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel starts its CSVs with a BOM
        reader = csv.reader(f)
        for fields in reader:
            fields = [c.strip() for c in fields]
            where = f"{path.name} line {reader.line_num}"
            if not any(fields) or (reader.line_num == 1 and [c.lower() for c in fields] == ["filename", "label"]):
                continue
            if len(fields) > 2:
                raise DatasetError(f"{where}: expected `filename,label`, got {len(fields)} fields; "
                                   "quote file names that contain commas")
            rows.append((fields[0], fields[1] if len(fields) == 2 else "", where))
    return rows


def _dataset_json_rows(raw: bytes, where: str) -> list[tuple[str, object, str]] | None:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise DatasetError(f"{where} is not valid JSON ({exn})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DatasetError(f'{where} must be {{"labels": [[name, label], ...]}} or {{"labels": null}}')
    return None if meta["labels"] is None else _json_rows(meta["labels"], where)


def _json_rows(data: object, where: str) -> list[tuple[str, object, str]]:
    if isinstance(data, dict):
        return [(name, label, f"{where} entry {name!r}") for name, label in data.items()]
    if not isinstance(data, list):
        raise DatasetError(f"{where} must hold an object {{filename: label}} or a list of [filename, label] pairs")
    rows = []
    for i, pair in enumerate(data):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise DatasetError(f"{where} item {i}: expected [filename, label], got {json.dumps(pair)[:80]}")
        rows.append((pair[0], pair[1], f"{where} item {i}"))
    return rows


def _clean_name(name: str, where: str, root: str) -> str:
    norm = posixpath.normpath(name)
    if not name or norm.startswith("/") or norm == "." or norm == ".." or norm.startswith("../"):
        raise DatasetError(f"{where}: {name!r} is not a file name relative to {root}")
    return norm


def _class_ids(labels: list) -> tuple[dict[str, int], Callable[[object], int]]:
    """Class name -> id and raw label -> id. Integer labels (or integer strings) sort numerically, names
    alphabetically; so integers that already are 0..K-1 keep their values as ids."""
    if all(isinstance(y, int) or _INTEGER.fullmatch(y) for y in labels):
        values = sorted({int(y) for y in labels})
        ids = {v: i for i, v in enumerate(values)}
        return {str(v): ids[v] for v in values}, lambda y: ids[int(y)]
    if any(isinstance(y, int) for y in labels):
        raise DatasetError("labels mix integers and class names; use one kind for every file")
    classes = {name: i for i, name in enumerate(sorted(set(labels)))}
    return classes, classes.__getitem__


def _check_label(name: str, label: object, where: str) -> object:
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DatasetError(f"{where}: no label for {name}; give it a class name or integer, or remove the row")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DatasetError(f"{where}: label {json.dumps(label)[:40]} for {name} is not a class name or an integer")
    return label.strip() if isinstance(label, str) else label


def _match_labels(rows, present: set[str], exists: Callable[[str], bool], root: str, labels_name: str,
                  unlabelled: str) -> tuple[list[tuple[str, int]], dict[str, int], int]:
    """Pair listed files with their labels; every image under `root` must be listed unless unlabelled='skip'."""
    listed: dict[str, tuple[object, str]] = {}
    for name, label, where in rows:
        clean = _clean_name(name, where, root)
        if clean in listed:
            raise DatasetError(f"{where}: {clean} is listed twice (also {listed[clean][1]}); keep one row")
        listed[clean] = (_check_label(clean, label, where), where)
    if not listed:
        raise DatasetError(f"{labels_name} lists no files")
    if missing := [(n, w) for n, (_, w) in listed.items() if not exists(n)]:
        shown = ", ".join(f"{n} ({w})" for n, w in missing[:_SHOWN])
        hint = "; a header row must be exactly filename,label" if missing[0][1].endswith(" line 1") else ""
        raise DatasetError(f"{len(missing)} file(s) listed in {labels_name} do not exist in {root}: {shown}; "
                           f"names are relative to {root}: fix them or remove the rows{hint}")
    unlisted = sorted(present - listed.keys())
    if unlisted and unlabelled != "skip":
        raise DatasetError(f"{len(unlisted)} image(s) in {root} are not in {labels_name}, e.g. "
                           f"{', '.join(unlisted[:_SHOWN])}; add them to {labels_name} or remove them, "
                           "or pass --unlabelled skip to leave them out")
    classes, to_id = _class_ids([label for label, _ in listed.values()])
    return sorted((n, to_id(label)) for n, (label, _) in listed.items()), classes, len(unlisted)


# --- decoding and encoding (runs in the workers) ------------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """How every image is stored: colour mode, square side, crop or pad, png or jpg."""

    mode: str
    resolution: int
    fit: str = "crop"
    image_format: str = "png"
    quality: int = 95


def is_gray(im: Image.Image) -> bool:
    """True for single-channel images, including palette images whose palette is all grays."""
    if im.mode in ("P", "PA"):
        pal = im.getpalette() or []
        return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
    return im.mode in ("1", "L", "LA", "F") or im.mode.startswith("I")


def _square(im: Image.Image, fit: str) -> Image.Image:
    """Center-crop the long side (fit=crop) or pad the short side with black, symmetrically (fit=pad)."""
    w, h = im.size
    if w == h:
        return im
    if fit == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return im.crop((left, top, left + side, top + side))
    side = max(w, h)
    canvas = Image.new(im.mode, (side, side))  # zeros: black in L and RGB
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    return canvas


def convert(im: Image.Image, mode: str, resolution: int, fit: str = "crop") -> Image.Image:
    """Convert to `mode`, make square by `fit` and resize to `resolution`."""
    if im.mode.startswith("I"):  # 16-bit grayscale: Pillow's convert() would clip at 255, so rescale
        im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if im.mode != mode:
        im = im.convert(mode)  # drops alpha; a palette becomes its colours
    im = _square(im, fit)
    if im.size[0] != resolution:
        # Lanczos is the sharpest anti-aliased filter for the usual case, downscaling photos.
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return im


def encode_image(im: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        im.save(buf, format="PNG")  # Pillow writes no timestamp chunk, so equal pixels give equal bytes
    else:
        # 4:4:4: chroma subsampling would halve the colour resolution of images that are small to begin with.
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def probe_file(files: Files, name: str) -> tuple[bool, tuple[int, int]] | str:
    """(grayscale?, size) from the header, or the reason the file cannot be read."""
    try:
        with files.open(name) as f, Image.open(f) as im:
            return is_gray(im), im.size
    except BAD_IMAGE as exn:
        return str(exn) or type(exn).__name__


def encode_file(files: Files, name: str, encoding: Encoding) -> bytes | str:
    """The encoded image, or the reason it cannot be read; truncated files only show up here, on full decode."""
    try:
        with files.open(name) as f, Image.open(f) as im:
            im.load()
            out = convert(im, encoding.mode, encoding.resolution, encoding.fit)
    except BAD_IMAGE as exn:
        return str(exn) or type(exn).__name__
    return encode_image(out, encoding.image_format, encoding.quality)


def map_items(fn: Callable, args: list, workers: int) -> Iterator:
    """fn over args in order: here, or in a pool of `workers` processes (results come back in order, so the
    output does not depend on the number of workers)."""
    if workers <= 1:
        yield from map(fn, args)
        return
    # Chunks amortise the pickling round trip; small enough that the progress bar still moves.
    chunksize = max(1, min(64, len(args) // (8 * workers)))
    with get_context().Pool(workers) as pool:  # closing this generator early terminates the pool
        yield from pool.imap(fn, args, chunksize)

