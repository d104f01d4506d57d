"""`gan-shards verify`: every shard of a dataset checked against its manifest (presence, sha256, samples)."""

import hashlib
import subprocess
from pathlib import Path

from tqdm import tqdm

from pipeline.data import storage
from pipeline.data.shards import MANIFEST, dataset_root, read_manifest
from pipeline.data.stream import samples_of


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, stream) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def _shard_problems(root: str, shard: dict, image_key: str) -> list[str]:
    """What is wrong with one shard: missing, checksum, sample count, samples without image or label."""
    try:
        stream = storage.open_file(root, shard["name"])
    except FileNotFoundError:
        return ["missing"]
    except (OSError, subprocess.TimeoutExpired) as exn:
        return [f"cannot open ({exn})"]
    unreadable, keys, incomplete = None, set(), 0
    with stream:
        hashing = _Hashing(stream)
        try:
            for sample in samples_of(hashing, shard["name"]):
                keys.add(sample["__key__"])
                incomplete += image_key not in sample or "cls" not in sample
        except (EOFError, ValueError, OSError) as exn:  # a cut-off tar, a damaged header, a failed read
            unreadable = f"not a readable tar ({exn})"
        sha = hashing.drain()
    problems = [unreadable] if unreadable else []
    if sha != shard["sha256"]:
        problems.append(f"sha256 {sha[:12]}... differs from the manifest's {shard['sha256'][:12]}...")
    if not unreadable and len(keys) != shard["num_samples"]:
        problems.append(f"{len(keys)} samples, the manifest says {shard['num_samples']}")
    if incomplete:
        problems.append(f"{incomplete} samples lack {image_key} or cls")
    return problems


def verify_shards(location: str | Path, *, progress: bool = False) -> list[str]:
    """Check every shard of a dataset against its manifest; return one line per problem ([] when all is well).
    Raises DatasetError when the manifest itself cannot be read."""
    root, manifest = dataset_root(location), read_manifest(location)
    found = []
    if (total := sum(s["num_samples"] for s in manifest["shards"])) != manifest["num_samples"]:
        found.append(f"{MANIFEST}: num_samples is {manifest['num_samples']} but its shards hold {total}")
    for shard in tqdm(manifest["shards"], unit="shard", desc="verify", disable=None if progress else True):
        if problems := _shard_problems(root, shard, manifest["image_format"]):
            found.append(f"{shard['name']}: {'; '.join(problems)}")
    return found
