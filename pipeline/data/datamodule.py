"""Stream gan-shards datasets into training as an endless, per-rank, reproducible batch stream."""

import hashlib
import io
import random

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.shards import ensure_shards, read_manifest


def _mix(*values: int) -> int:
    """A well-spread 31-bit seed from integers."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class _StreamSeed:
    """Seed of one (rank, worker) stream; the rank is fixed when the loader is built, the worker read in the worker."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self) -> int:
        info = torch.utils.data.get_worker_info()
        # Not webdataset's rank * 1000 + worker: its make_seed is linear (961 * worker_seed + 31 * epoch + seed),
        # so worker 1's epoch 0 would replay worker 0's epoch 31, and seed 31 would replay seed 0's epoch 1.
        return _mix(self.seed, self.rank, info.id if info is not None else 0)


class _SeededShuffle:
    """Sample shuffle buffer whose RNG depends on (seed, rank, worker, epoch) like the shard sampler's."""

    def __init__(self, bufsize: int, stream_seed: _StreamSeed, first_epoch: int) -> None:
        self.bufsize, self.stream_seed = bufsize, stream_seed
        self.epoch = first_epoch - 1  # incremented on each pass, in step with ResampledShards.epoch

    def __call__(self, src):
        self.epoch += 1
        if self.bufsize < 2:
            return src
        rng = random.Random(_mix(self.stream_seed(), self.epoch))
        # initial=bufsize: fill the buffer before the first sample so early batches are mixed too.
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


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


class ShardDataModule(L.LightningDataModule):
    """Endless stream of (x (B, C, H, W) in [-1, 1], y (B,) long) batches from gan-shards shards.

    Shards are drawn with replacement, so no rank ever runs out (uneven shards hang DDP), and every
    epoch is exactly `batches_per_epoch` batches on every rank. The stream of epoch e on rank r,
    worker w is a function of (seed, r, w, e) only: ranks and workers differ, reruns repeat.
    """

    def __init__(self, *, name: str, source: str = "digits", cache_dir: str, resolution: int, channels: int,
                 num_classes: int, batch_size: int, num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0,
                 batches_per_epoch: int = 1000) -> None:
        super().__init__()
        for key, value, least in (("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1),
                                  ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 0)):
            if value < least:
                raise ValueError(f"data.{key}={value} must be at least {least}")
        self.name, self.source, self.cache_dir = name, source, cache_dir
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.seed, self.batches_per_epoch = seed, batches_per_epoch
        self.manifest: dict | None = None
        self.shard_dir = None
        self._first_epoch: int | None = None

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

    def set_epoch_seed(self, offset: int) -> None:
        """Start the stream at epoch `offset` instead of the trainer's current epoch; call before train_dataloader()."""
        self._first_epoch = offset

    def _manifest(self) -> dict:
        if self.manifest is None:
            self.setup()
        return self.manifest

    def _first_stream_epoch(self) -> int:
        # A run resumed at epoch E then streams what an uninterrupted run streams from epoch E on: Lightning
        # restores current_epoch before it builds the train loader.
        if self._first_epoch is not None:
            return self._first_epoch
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> wds.WebLoader:
        """Build the resampled, shuffled, batched stream; `batches_per_epoch` batches per epoch on every rank."""
        manifest = self._manifest()
        urls = [str(self.shard_dir / s["name"]) for s in manifest["shards"]]
        # Rank is read here in the main process (RANK/WORLD_SIZE from torchrun, else torch.distributed), so
        # spawned or forked workers need neither. Worker id comes from get_worker_info() inside the worker.
        stream_seed = _StreamSeed(self.seed, rank=wds.utils.pytorch_worker_info()[0])
        first_epoch = self._first_stream_epoch()
        # Not WebDataset(resampled=True, seed=...): 1.0.2 drops that seed for resampled shards and mixes
        # pid/time into the draw. deterministic=True seeds each draw from (stream_seed(), epoch) only, and
        # since every rank and worker draws its own shards, no node/worker splitter is needed.
        shards = wds.ResampledShards(urls, seed=0, worker_seed=stream_seed, deterministic=True)
        shards.epoch = first_epoch - 1  # __iter__ increments before use
        pipeline = wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(),
            _SeededShuffle(self.shuffle_buffer, stream_seed, first_epoch),
            wds.to_tuple("png", "cls"),
            wds.map_tuple(_decode_png, int),
            wds.batched(self.batch_size, collation_fn=_collate, partial=False),
        )
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)
        # with_epoch on the loader counts batches (not samples per worker), so every rank stops together.
        # with_length lets Lightning's progress bar show the epoch's length.
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)
