"""Stream gan-shards datasets into training as an endless, per-rank, reproducible batch stream."""

import lightning as L
import torch
import webdataset as wds

from pipeline.data import storage
from pipeline.data.shards import MANIFEST, ensure_shards, read_manifest
from pipeline.data.stream import (
    Batches,
    Decode,
    Health,
    ReadShards,
    SeededShuffle,
    ShardDraw,
    SkipTrained,
    Stream,
    mix_seed,
    to_float,
)


class ShardDataModule(L.LightningDataModule):
    """Endless stream of (x (B, C, H, W), y (B,) long, health (4,) long) batches from gan-shards shards; x is uint8
    from the loader and float32 in [-1, 1] once on the device (on_after_batch_transfer).

    `source` is 'digits', a shard folder, an fsspec URL (s3://bucket/ds, memory://ds, ...) or a `pipe:` command
    with {name} for the file (see pipeline/data/storage.py); the shard list comes from its manifest. Shards are
    drawn with replacement, so no rank ever runs out (uneven shards hang DDP), and every epoch is exactly
    `batches_per_epoch` batches on every rank. The stream of epoch e on rank r, worker w is a function of
    (seed, r, w, e) only: ranks and workers read disjoint data, reruns repeat. Bad samples are skipped and
    counted in each batch's `health` (good, bad images, bad labels, bad shards; see pipeline/data/health.py).
    """

    def __init__(self, *, name: str, source: str = "digits", cache_dir: str, resolution: int, channels: int,
                 num_classes: int, batch_size: int, num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0,
                 hflip: bool = False, max_bad_fraction: float = 0.01, batches_per_epoch: int = 1000,
                 batch_plan: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction} must be in [0, 1): the share of bad samples "
                             "that stops the run (0.01: more than 1%)")
        for key, value, least in (("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1),
                                  ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 0)):
            if value < least:
                raise ValueError(f"data.{key}={value} must be at least {least}")
        self.name, self.source, self.cache_dir = name, source, cache_dir
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.seed, self.batches_per_epoch = seed, batches_per_epoch
        self.hflip, self.max_bad_fraction = hflip, max_bad_fraction
        # (first global batch, batch size) of each progressive stage; None: batch_size throughout.
        self.batch_plan = [tuple(p) for p in batch_plan] if batch_plan else None
        self.manifest: dict | None = None
        self.shard_dir: str | None = None  # where the shards are: a folder, URL or pipe: template
        self._start: tuple[int, int] | None = None
        self._loader: torch.utils.data.DataLoader | None = None

    def prepare_data(self) -> None:
        """Write the digits shards once per node before the ranks set up (setup() also copes alone)."""
        self._locate()

    def _locate(self) -> str:
        if storage.local_path(self.source) is None:  # a URL or pipe: the manifest is read from there
            if not storage.exists(self.source, MANIFEST):
                raise ValueError(f"data.source={self.source!r} has no {MANIFEST}: write the dataset there with "
                                 f"gan-shards IMAGES {self.source}")
            return self.source
        source = self.source if self.source == "digits" else str(storage.local_path(self.source))  # file:// too
        return str(ensure_shards(source, self.cache_dir, resolution=self.resolution))

    def setup(self, stage: str | None = None) -> None:
        """Find the shards, read the manifest and check that the data.* config agrees with it."""
        self.shard_dir = self._locate()
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
        expected = {storage.join(self.shard_dir, s["name"]): s["num_samples"] for s in manifest["shards"]}
        urls = list(expected)
        # Rank and world size are read here in the main process (RANK/WORLD_SIZE from torchrun, else
        # torch.distributed), so spawned or forked workers need neither. Stream splits the data between
        # ranks and workers itself (see there), so no node/worker splitter is needed.
        first_epoch, trained = self._start_position()
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        stream = Stream(seed=self.seed, rank=rank, world=world, first_epoch=first_epoch, trained=trained,
                        batch_size=self.batch_size, batches_per_epoch=self.batches_per_epoch,
                        batch_plan=self.batch_plan)
        health = Health(self.max_bad_fraction, self.source)
        pipeline = wds.DataPipeline(
            ShardDraw(urls, stream),
            ReadShards(stream, health, expected),
            SeededShuffle(self.shuffle_buffer, stream),
            Decode(stream, health, resolution=self.resolution, channels=self.channels, num_classes=self.num_classes,
                   hflip=self.hflip),
            SkipTrained(stream, health),
            Batches(stream, health),
        )
        # The DataLoader draws its workers' base seed at every iter(), from the global torch RNG unless it has a
        # generator of its own. That draw would shift the latents of a run resumed inside an epoch (its RNG
        # state is restored, then the loader is iterated once more), so it gets its own.
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0,
                               generator=torch.Generator().manual_seed(mix_seed(self.seed, stream.rank)))
        # with_epoch on the loader counts batches (not samples per worker), so every rank stops together.
        # with_length lets Lightning's progress bar show the epoch's length.
        self._loader = loader.pipeline[0]  # the DataLoader, for teardown
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, ...], dataloader_idx: int) -> tuple[torch.Tensor, ...]:
        """The pixels become float32 in [-1, 1] on the device they train on (they travel as uint8)."""
        return (to_float(batch[0]), *batch[1:])

    def teardown(self, stage: str | None = None) -> None:
        """Stop the persistent workers when fit ends, also when it ends by an exception (SIGTERM, a fault).

        Otherwise they live until the loader is garbage-collected, and workers forked from a process with
        other threads can take tens of seconds to exit then.
        """
        iterator = getattr(self._loader, "_iterator", None)  # persistent workers' iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None
