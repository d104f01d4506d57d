"""The stages of a training stream: shard draw, tar reading, shuffle, decode and check, resume skip, batches.

A (rank, worker) stream is a generator pipeline; webdataset supplies the tar parsing and the shuffle buffer.
The stages are ours where the field's do not fit: the draw must know the epoch and the worker's role on a
resumed epoch, ranks and workers must read disjoint data, and a bad sample must be counted, not only skipped.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import random
import sys
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import storage
from pipeline.training.progressive import batch_size_at

# What can be wrong with data, in the order of a batch's health record (after the good samples).
PROBLEMS = ("bad_image", "bad_label", "bad_shard")
DATA_ERROR_EXIT_CODE = 5  # gan-train's exit code when too much data is bad (4 is a lost peer)
_REPORTED = 5  # a worker prints the first few problems of each kind in full, then only counts them


class DataError(RuntimeError):
    """Too much of the data is unreadable: the run stops, naming what was bad and the fix."""


def mix_seed(*values: int) -> int:
    """A well-spread 31-bit seed from integers."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def bad_data_message(counts: dict[str, int], max_bad_fraction: float, source: str) -> str:
    ok, bad = counts.get("ok", 0), sum(counts.get(k, 0) for k in PROBLEMS)
    return (f"{bad} of {ok + bad} samples read were bad ({bad / max(ok + bad, 1):.1%}: {counts.get('bad_image', 0)} "
            f"images that do not decode or have the wrong size, {counts.get('bad_label', 0)} missing or invalid "
            f"labels, {counts.get('bad_shard', 0)} unreadable or truncated shards), more than "
            f"data.max_bad_fraction={max_bad_fraction}. Check the shards with `gan-shards verify {source}` and "
            "rewrite the bad ones, or raise data.max_bad_fraction to train on what is readable")


class Health:
    """One stream's count of good and bad samples: the delta rides on each batch, the total guards the worker.

    The run's verdict is taken on every batch from the counts of all ranks (pipeline/data/health.py); this
    guard is for a worker that finds almost nothing readable and would otherwise never make a batch.
    """

    JUDGE_AFTER = 1000  # samples read before a fraction is judged: 1% of 1000 is 10 +- 3 (binomial)

    def __init__(self, max_bad_fraction: float, source: str) -> None:
        self.max_bad_fraction, self.source = max_bad_fraction, source
        self.total, self.pending = Counter(), Counter()

    def good(self) -> None:
        self.total["ok"] += 1
        self.pending["ok"] += 1

    def bad(self, kind: str, where: str, why: object) -> None:
        self.total[kind] += 1
        self.pending[kind] += 1
        if self.total[kind] <= _REPORTED:
            note = " (further ones are only counted)" if self.total[kind] == _REPORTED else ""
            print(f"gan-train: data: skipped {kind.replace('_', ' ')} {where}: {why}{note}", file=sys.stderr)
        read = sum(self.total.values())
        bad = read - self.total["ok"]
        if (read >= self.JUDGE_AFTER and bad > self.max_bad_fraction * read) or (self.total["ok"] == 0 and bad >= 100):
            raise DataError(bad_data_message(dict(self.total), self.max_bad_fraction, self.source))

    def take(self) -> torch.Tensor:
        """Counts since the last batch, int64 (1 + len(PROBLEMS),): ok, then each problem."""
        record = torch.tensor([self.pending["ok"]] + [self.pending[k] for k in PROBLEMS], dtype=torch.long)
        self.pending.clear()
        return record


class Stream:
    """One (rank, worker) stream's per-epoch state, shared by its stages.

    Epoch e of rank r's worker w is a function of (seed, r, w, e) only. A run resumed k batches into
    epoch E continues it exactly: the loader takes batch i from worker i % W, always starting with
    worker 0, so in epoch E worker w plays worker (w + k) % W and first drops the batches that one
    made before the checkpoint.

    Ranks and workers read disjoint data: with at least as many shards as streams (ranks x workers), stream s
    draws only shards s, s + S, s + 2S, ...; with fewer, every stream reads every shard and keeps the samples
    at positions s, s + S, ... inside it (small datasets such as the digits' two shards).
    """

    def __init__(self, *, seed: int, rank: int, world: int, first_epoch: int, trained: int, batch_size: int,
                 batches_per_epoch: int, batch_plan: list[tuple[int, int]] | None = None) -> None:
        self.base_seed, self.rank, self.world = seed, rank, world  # fixed in the main process; the worker read in it
        self.first_epoch, self.trained, self.batch_size = first_epoch, trained, batch_size
        self.batches_per_epoch, self.plan = batches_per_epoch, batch_plan or [(0, batch_size)]
        self.epoch = first_epoch - 1
        self.worker, self.workers, self.skipped_batches = 0, 1, 0

    def begin_epoch(self) -> None:
        self.epoch += 1
        info = torch.utils.data.get_worker_info()
        worker, self.workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resumed = self.epoch == self.first_epoch and self.trained > 0
        self.worker = (worker + self.trained) % self.workers if resumed else worker
        self.skipped_batches = -(-max(0, self.trained - self.worker) // self.workers) if resumed else 0

    @property
    def slot(self) -> tuple[int, int]:
        """(this stream's index, number of streams) over all ranks and workers."""
        return self.rank * self.workers + self.worker, self.world * self.workers

    def batch_sizes(self) -> Iterator[int]:
        """Sizes of this worker's batches of the epoch, skipped ones first: it makes the epoch's batches
        worker, worker + W, worker + 2W, ..., each as large as the schedule's plan says for that global batch."""
        first = self.epoch * self.batches_per_epoch + self.worker
        return (batch_size_at(self.plan, first + n * self.workers) for n in itertools.count())

    @property
    def skip(self) -> int:
        """Samples of the batches this worker made before the checkpoint, in this epoch."""
        return sum(itertools.islice(self.batch_sizes(), self.skipped_batches))

    def seed(self) -> int:
        # Not webdataset's rank * 1000 + worker: its make_seed is linear (961 * worker_seed + 31 * epoch + seed),
        # so worker 1's epoch 0 would replay worker 0's epoch 31, and seed 31 would replay seed 0's epoch 1.
        return mix_seed(self.base_seed, self.rank, self.worker)


class ShardDraw(torch.utils.data.IterableDataset):
    """Shards drawn with replacement from this stream's share, the draw seeded by (stream seed, epoch) only.

    The draw of webdataset's ResampledShards(deterministic=True), which reads the worker only through a
    seed callback that is not told the epoch; a resumed epoch needs the worker's role for that epoch.
    """

    def __init__(self, urls: list[str], stream: Stream) -> None:
        super().__init__()
        self.urls, self.stream = urls, stream

    def __iter__(self):
        self.stream.begin_epoch()  # eagerly, before the later stages read the epoch
        slot, streams = self.stream.slot
        urls = self.urls[slot::streams] if len(self.urls) >= streams else self.urls
        rng = random.Random(wds.utils.make_seed(self.stream.seed(), self.stream.epoch, 0))
        return (urls[rng.randint(0, len(urls) - 1)] for _ in itertools.count())


def _open(url: str):
    if storage.is_pipe(url) or not storage.is_url(url):
        return wds.gopen(url)  # local files, and pipe: commands (whose exit status is checked on close)
    return storage.open_stream(url)


def tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream; EOFError if it ends inside a member or before its end.

    By hand, not tarfile (which webdataset uses): on 32x32 PNGs tarfile's header parsing costs more than the
    image decode (bench/data_throughput.py). Reads ustar, GNU long names and pax path records, which covers
    what tarfile, GNU tar and webdataset's TarWriter write; header checksums are checked.
    """
    long_name = None
    while True:
        header = f.read(512)
        if len(header) < 512:
            raise EOFError("the tar ends inside a header (no end-of-archive blocks)")
        if header.count(0) == 512:
            return  # end of archive
        checksum = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ValueError("tar header checksum mismatch: the shard is damaged")
        size, kind = int(header[124:136].rstrip(b"\0 ") or b"0", 8), header[156:157]
        data = f.read(size)
        if len(data) < size:
            raise EOFError(f"the tar ends inside a member ({len(data)} of {size} bytes)")
        if size % 512:
            f.read(512 - size % 512)
        if kind in (b"0", b"\0", b"7"):
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name = long_name or ((prefix + b"/" if prefix else b"") + header[:100].split(b"\0", 1)[0]).decode()
            long_name = None
            yield name, data
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind == b"x":  # pax extended header of the next member: "<len> key=value\n" records
            for record in data.decode().splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value


def samples_of(f, url: str) -> Iterator[dict]:
    """Tar members grouped into webdataset samples: {'__key__': ..., '__url__': ..., ext: bytes, ...}."""
    sample = None
    for name, data in tar_members(f):
        folder, _, base = name.rpartition("/")
        key, dot, ext = base.partition(".")  # webdataset's rule: the key ends at the basename's first dot
        if not dot or key.startswith("__"):
            continue
        key = f"{folder}/{key}" if folder else key
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample


class ReadShards:
    """Tar files -> samples; a shard that cannot be opened or ends early counts as one bad shard.

    A shard cut off at a member boundary could look whole, so a shard is also bad when it holds fewer samples
    than its manifest entry says. The samples read before the cut are kept, but the last one is held back
    until the shard is known to be whole, since it may have lost its image. With fewer shards
    than streams, keeps this stream's positions inside each shard (see Stream).
    """

    def __init__(self, stream: Stream, health: Health, expected: dict[str, int]) -> None:
        self.stream, self.health, self.expected = stream, health, expected

    def __call__(self, urls):
        for url in urls:
            slot, streams = self.stream.slot
            held, position = None, -1
            try:
                with _open(url) as f:
                    for position, sample in enumerate(samples_of(f, url)):
                        if held is not None:
                            yield held
                        held = sample if position % streams == slot else None
                if position + 1 < self.expected.get(url, 0):
                    raise EOFError(f"{position + 1} of its {self.expected[url]} samples, then the end of the tar")
            except Exception as exn:  # tarfile.ReadError, OSError, a failed pipe: command, a duplicate key ...
                self.health.bad("bad_shard", url, exn)
                continue
            if held is not None:
                yield held


class SeededShuffle:
    """Sample shuffle buffer whose RNG depends on (seed, rank, worker, epoch) like the shard draw's."""

    def __init__(self, bufsize: int, stream: Stream) -> None:
        self.bufsize, self.stream = bufsize, stream

    def __call__(self, src):
        if self.bufsize < 2:
            return src
        rng = random.Random(mix_seed(self.stream.seed(), self.stream.epoch))
        # initial=bufsize: fill the buffer before the first sample so early batches are mixed too.
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class Decode:
    """Sample dict -> (uint8 (H, W, C) pixels, label), checked against the manifest; bad ones counted and dropped.

    The horizontal flip is drawn here, per sample from the stream's RNG, so a resumed stream flips the same ones.
    """

    def __init__(self, stream: Stream, health: Health, *, resolution: int, channels: int, num_classes: int,
                 hflip: bool) -> None:
        self.stream, self.health, self.hflip = stream, health, hflip
        self.shape = (resolution, resolution, channels)
        self.num_classes = num_classes

    def __call__(self, src):
        rng = random.Random(mix_seed(self.stream.seed(), self.stream.epoch, 1))
        for sample in src:
            pixels = self._pixels(sample)
            label = self._label(sample) if pixels is not None else None
            if label is None:
                continue
            if self.hflip and rng.random() < 0.5:
                pixels = pixels[:, ::-1]
            self.health.good()
            yield pixels, label

    def _pixels(self, sample: dict) -> np.ndarray | None:
        data = sample.get("png", sample.get("jpg", sample.get("jpeg")))
        if data is None:
            self.health.bad("bad_image", _where(sample), f"no png or jpg entry (has {sorted(sample)})")
            return None
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = np.asarray(im)
        except Exception as exn:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
            self.health.bad("bad_image", _where(sample), exn)
            return None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape != self.shape or pixels.dtype != np.uint8:
            self.health.bad("bad_image", _where(sample), f"{pixels.dtype} {pixels.shape}, expected uint8 {self.shape}")
            return None
        return pixels

    def _label(self, sample: dict) -> int | None:
        if self.num_classes == 0:  # unconditional: the label is not used
            return 0
        try:
            label = int(sample["cls"])
        except (KeyError, ValueError) as exn:
            self.health.bad("bad_label", _where(sample), f"no integer cls entry ({exn!r})")
            return None
        if not 0 <= label < self.num_classes:
            self.health.bad("bad_label", _where(sample), f"label {label} outside 0..{self.num_classes - 1}")
            return None
        return label


def _where(sample: dict) -> str:
    return f"{sample.get('__key__')} in {sample.get('__url__')}"


class SkipTrained:
    """Drops the samples a resumed run already trained on in this epoch (see Stream), after their checks,
    so that bad samples among them do not shift the stream; their counts are already in the checkpoint."""

    def __init__(self, stream: Stream, health: Health) -> None:
        self.stream, self.health = stream, health

    def __call__(self, src):
        src = iter(src)
        skip = self.stream.skip
        if skip:
            for _ in itertools.islice(src, skip):
                pass
            self.health.take()
        yield from src


class Batches:
    """(x (B, C, H, W) uint8, y (B,) int64, health (4,) int64) batches whose sizes follow the stream's plan
    (progressive growing's per-stage batch sizes).

    Pixels stay uint8 until they reach the device (ShardDataModule.on_after_batch_transfer): a quarter of the
    bytes through the workers' shared memory and the host-to-device copy (bench/data_throughput.py)."""

    def __init__(self, stream: Stream, health: Health) -> None:
        self.stream, self.health = stream, health

    def __call__(self, src):
        sizes = itertools.islice(self.stream.batch_sizes(), self.stream.skipped_batches, None)
        src = iter(src)
        for size in sizes:
            samples = list(itertools.islice(src, size))
            if len(samples) < size:
                return
            pixels = torch.from_numpy(np.stack([p for p, _ in samples]))  # (B, H, W, C) uint8
            x = pixels.permute(0, 3, 1, 2).contiguous()
            yield x, torch.tensor([y for _, y in samples], dtype=torch.long), self.health.take()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (exact for every byte: v / 127.5 - 1)."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x
