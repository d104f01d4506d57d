"""Stream gan-shards datasets into training as an endless, per-rank, reproducible batch stream."""

import hashlib
import io
import itertools
import random
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.shards import ensure_shards, read_manifest
from pipeline.training.progressive import batch_size_at


def _mix(*values: int) -> int:
    """A well-spread 31-bit seed from integers."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class _Stream:
    """One (rank, worker) stream's per-epoch state, shared by its shard draw, shuffle and resume skip.

    Epoch e of rank r's worker w is a function of (seed, r, w, e) only. A run resumed k batches into
    epoch E continues it exactly: the loader takes batch i from worker i % W, always starting with
    worker 0, so in epoch E worker w plays worker (w + k) % W and first drops the batches that one
    made before the checkpoint, as raw samples (nothing decoded).
    """

    def __init__(self, *, seed: int, rank: int, first_epoch: int, trained: int, batch_size: int,
                 batches_per_epoch: int, batch_plan: list[tuple[int, int]] | None = None) -> None:
        self.base_seed, self.rank = seed, rank  # the rank is fixed in the main process, the worker read in it
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
        return _mix(self.base_seed, self.rank, self.worker)


class _ShardDraw(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, the draw seeded by (stream seed, epoch) only.

    The draw of webdataset's ResampledShards(deterministic=True), which reads the worker only through a
    seed callback that is not told the epoch; a resumed epoch needs the worker's role for that epoch.
    Its WebDataset(resampled=True, seed=...) form drops the seed in 1.0.2 and mixes in pid and time.
    """

    def __init__(self, urls: list[str], stream: _Stream) -> None:
        super().__init__()
        self.urls, self.stream = urls, stream

    def __iter__(self):
        self.stream.begin_epoch()  # eagerly, before the later stages read the epoch
        rng = random.Random(wds.utils.make_seed(self.stream.seed(), self.stream.epoch, 0))
        return (dict(url=self.urls[rng.randint(0, len(self.urls) - 1)]) for _ in itertools.count())


class _SeededShuffle:
    """Sample shuffle buffer whose RNG depends on (seed, rank, worker, epoch) like the shard draw's."""

    def __init__(self, bufsize: int, stream: _Stream) -> None:
        self.bufsize, self.stream = bufsize, stream

    def __call__(self, src):
        if self.bufsize < 2:
            return src
        rng = random.Random(_mix(self.stream.seed(), self.stream.epoch))
        # initial=bufsize: fill the buffer before the first sample so early batches are mixed too.
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class _SkipTrained:
    """Drops the samples a resumed run already trained on in this epoch (see _Stream)."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream

    def __call__(self, src):
        return itertools.islice(src, self.stream.skip, None)


def _decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> float32 (C, H, W) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as im:
        pixels = np.array(im)  # (H, W) or (H, W, 3) uint8
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class _PlannedBatches:
    """Batches whose sizes follow the stream's plan (per-stage batch sizes of progressive growing)."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream

    def __call__(self, src):
        sizes = itertools.islice(self.stream.batch_sizes(), self.stream.skipped_batches, None)
        src = iter(src)
        for size in sizes:
            samples = list(itertools.islice(src, size))
            if len(samples) < size:
                return
            yield _collate(samples)


class ShardDataModule(L.LightningDataModule):
    """Endless stream of (x (B, C, H, W) in [-1, 1], y (B,) long) batches from gan-shards shards.

    Shards are drawn with replacement, so no rank ever runs out (uneven shards hang DDP), and every
    epoch is exactly `batches_per_epoch` batches on every rank. The stream of epoch e on rank r,
    worker w is a function of (seed, r, w, e) only: ranks and workers differ, reruns repeat.
    """

    def __init__(self, *, name: str, source: str = "digits", cache_dir: str, resolution: int, channels: int,
                 num_classes: int, batch_size: int, num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0,
                 batches_per_epoch: int = 1000, batch_plan: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        for key, value, least in (("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1),
                                  ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 0)):
            if value < least:
                raise ValueError(f"data.{key}={value} must be at least {least}")
        self.name, self.source, self.cache_dir = name, source, cache_dir
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.seed, self.batches_per_epoch = seed, batches_per_epoch
        # (first global batch, batch size) of each progressive stage; None: batch_size throughout.
        self.batch_plan = [tuple(p) for p in batch_plan] if batch_plan else None
        self.manifest: dict | None = None
        self.shard_dir = None
        self._start: tuple[int, int] | None = None
        self._loader: torch.utils.data.DataLoader | None = None

    def prepare_data(self) -> None:
        """Write the digits shards once per node before the ranks set up (setup() also copes alone)."""
        ensure_shards(self.source, self.cache_dir, resolution=self.resolution)

    def setup(self, stage: str | None = None) -> None:
        """Find the shards, read the manifest and check that the data.* config agrees with it."""
        self.shard_dir = ensure_shards(self.source, self.cache_dir, resolution=self.resolution)
        manifest = read_manifest(self.shard_dir)
        where = f"the shards in {self.shard_dir}"
        if manifest["resolution"] != self.resolution:
            r = manifest["resolution"]
            raise ValueError(f"data.resolution={self.resolution} but {where} are {r}x{r}; set data.resolution={r} "
                             f"or rewrite the shards with gan-shards --resolution {self.resolution}")
        if manifest["channels"] != self.channels:
            raise ValueError(f"data.channels={self.channels} but {where} have {manifest['channels']} channels; "
                             f"set data.channels={manifest['channels']}")
        if manifest["num_classes"] != self.num_classes:
            raise ValueError(f"data.num_classes={self.num_classes} but {where} have {manifest['num_classes']} "
                             f"classes; set data.num_classes={manifest['num_classes']}")
        self.manifest = manifest

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by label (empty for an unconditional dataset)."""
        classes = self._manifest()["classes"]
        return sorted(classes, key=classes.get)

    def label_frequencies(self) -> torch.Tensor:
        """Fraction of samples per label, float32 (num_classes,); empty for an unconditional dataset."""
        manifest = self._manifest()
        counts = torch.tensor([manifest["class_counts"][str(i)] for i in range(manifest["num_classes"])])
        return counts.float() / max(int(counts.sum()), 1)

    def start_at(self, epoch: int, batches: int = 0) -> None:
        """Begin the stream at `epoch`, after its first `batches` batches, instead of where the trainer is."""
        self._start = (epoch, batches)

    def _manifest(self) -> dict:
        if self.manifest is None:
            self.setup()
        return self.manifest

    def _start_position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on) where this fit begins: (0, 0) for a new run.

        A resumed run streams exactly what the uninterrupted run would have from there. Lightning has
        restored its loop progress before it builds the train loader: `epoch_progress.processed` counts
        finished epochs (a checkpoint from on_train_epoch_end already counts its epoch), and a checkpoint
        from inside an epoch (SIGTERM, on_train_batch_end) leaves the fit loop `restarting`, with the
        batches it trained on in `batch_progress.processed`. After the epoch's last batch Lightning goes on
        to the next epoch without asking for a new iterator, so that one must be the next epoch's stream.
        """
        if self._start is not None:
            return self._start
        if self.trainer is None:
            return 0, 0
        fit = self.trainer.fit_loop
        epoch = fit.epoch_progress.current.processed
        batches = fit.epoch_loop.batch_progress.current.processed if fit.restarting else 0
        if batches >= self.batches_per_epoch:  # saved after the epoch's last batch, before its end: the next one
            return epoch + 1, 0
        return epoch, batches

    def train_dataloader(self) -> wds.WebLoader:
        """Build the resampled, shuffled, batched stream; `batches_per_epoch` batches per epoch on every rank."""
        manifest = self._manifest()
        urls = [str(self.shard_dir / s["name"]) for s in manifest["shards"]]
        # Rank is read here in the main process (RANK/WORLD_SIZE from torchrun, else torch.distributed), so
        # spawned or forked workers need neither. Every rank and worker draws its own shards, so no
        # node/worker splitter is needed.
        first_epoch, trained = self._start_position()
        stream = _Stream(seed=self.seed, rank=wds.utils.pytorch_worker_info()[0], first_epoch=first_epoch,
                         trained=trained, batch_size=self.batch_size, batches_per_epoch=self.batches_per_epoch,
                         batch_plan=self.batch_plan)
        pipeline = wds.DataPipeline(
            _ShardDraw(urls, stream),
            wds.tarfile_to_samples(),
            _SeededShuffle(self.shuffle_buffer, stream),
            _SkipTrained(stream),
            wds.to_tuple("png", "cls"),
            wds.map_tuple(_decode_png, int),
            _PlannedBatches(stream) if self.batch_plan else wds.batched(self.batch_size, collation_fn=_collate,
                                                                         partial=False),
        )
        # The DataLoader draws its workers' base seed at every iter(), from the global torch RNG unless it has a
        # generator of its own. That draw would shift the latents of a run resumed inside an epoch (its RNG
        # state is restored, then the loader is iterated once more), so it gets its own.
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0,
                               generator=torch.Generator().manual_seed(_mix(self.seed, stream.rank)))
        # with_epoch on the loader counts batches (not samples per worker), so every rank stops together.
        # with_length lets Lightning's progress bar show the epoch's length.
        self._loader = loader.pipeline[0]  # the DataLoader, for teardown
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    def teardown(self, stage: str | None = None) -> None:
        """Stop the persistent workers when fit ends, also when it ends by an exception (SIGTERM, a fault).

        Otherwise they live until the loader is garbage-collected, and workers forked from a process with
        other threads can take tens of seconds to exit then.
        """
        iterator = getattr(self._loader, "_iterator", None)  # persistent workers' iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None
