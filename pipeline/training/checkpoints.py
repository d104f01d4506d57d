"""Checkpoint files that survive crashes: atomic writes with a checksum, verification, and the resume choice.

A pod can be killed at any moment, also in the middle of a save. Lightning's TorchCheckpointIO writes
straight into the target file, so a crash there leaves a truncated `last.ckpt` behind, and the next
`resume=auto` fails on it. `AtomicCheckpointIO` writes to a temporary file in the same directory,
fsyncs it, renames it over the target (atomic on POSIX filesystems) and fsyncs the directory; the
previous file stays intact until the rename. Each checkpoint gets a `<name>.sha256` beside it, so that
corruption after the write (a bad disk, a partial copy) is caught too, not only truncation. While a file
is replaced, its `.sha256` lists the digests of both the old and the new content, so a crash between the
two renames leaves whichever file is there verifiable.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

REQUIRED_KEYS = ("state_dict", "counters")  # what resuming a GAN needs besides Lightning's own entries


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and why."""


class _HashingWriter:
    """A binary file that hashes what torch.save writes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_write(path: Path, write: Any, before_rename: Any = None) -> str:
    """`write(file)` into a temporary file, fsync, `before_rename(sha256)`, rename over `path`; returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        digest = writer.sha.hexdigest()
        if before_rename is not None:
            before_rename(digest)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return digest


def _recorded_digests(path: Path) -> list[str]:
    """The digests a checkpoint's `.sha256` accepts (empty if there is none)."""
    sidecar = _checksum_path(path)
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()] if sidecar.is_file() else []


def _record_digests(path: Path, digests: list[str]) -> None:
    atomic_write(_checksum_path(path), lambda f: f.write("".join(f"{d}  {path.name}\n" for d in digests).encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic and checksummed (local and mounted shared filesystems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # object stores have their own atomic puts
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        previous = _recorded_digests(path) if path.is_file() else []
        # Before the rename both the old and the new digest are valid; after it, only the new one.
        digest = atomic_write(path, lambda f: torch.save(checkpoint, f),
                              before_rename=lambda new: _record_digests(path, [new, *previous]))
        _record_digests(path, [digest])

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        _checksum_path(Path(path)).unlink(missing_ok=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check `path`'s recorded checksum, that it loads as plain data and holds a GAN run; CheckpointError if not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    expected = _recorded_digests(path)
    if expected:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() not in expected:
            raise CheckpointError(f"{path}: corrupt (sha256 {sha.hexdigest()[:12]}... differs from the "
                                  f"{expected[0][:12]}... recorded when it was written)")
    try:  # mmap: the tensors are mapped, not read; Lightning loads the file for real afterwards
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a checkpoint, pickled code
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a gan-pipeline training checkpoint (no {', '.join(missing)})")
    return ckpt


def _kimg(path: Path) -> float:
    match = re.fullmatch(r"kimg-([0-9.]+)\.ckpt", path.name)
    return float(match.group(1)) if match else -1.0


def find_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """resume=null -> None; auto -> the newest intact checkpoint of run_dir (None if there is none);
    a file or a run directory -> its checkpoint, which must be intact."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        ckpt_dir = run_dir / "checkpoints"
        candidates = [ckpt_dir / "last.ckpt"] + sorted(ckpt_dir.glob("kimg-*.ckpt"), key=_kimg, reverse=True)
        candidates = [c for c in candidates if c.is_file()]
        for i, candidate in enumerate(candidates):
            try:
                verify_checkpoint(candidate)
            except CheckpointError as e:
                print(f"gan-train: skipping {e}", file=sys.stderr)
                continue
            if i > 0:
                print(f"gan-train: resuming from {candidate.name}, the newest intact checkpoint", file=sys.stderr)
            return str(candidate)
        if candidates:
            raise CheckpointError(f"resume=auto: none of the {len(candidates)} checkpoints in {ckpt_dir} is intact; "
                                  "move them away to start fresh, or give resume=<file>")
        return None
    path = Path(resume)
    for candidate in (path, path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            verify_checkpoint(candidate)
            return str(candidate)
    raise CheckpointError(f"resume={resume!r}: no checkpoint there. Give a .ckpt file, a run directory, or resume=auto")
