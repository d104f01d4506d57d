"""ShardDataModule: batch contract, epoch length, and which streams are equal or different."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datamodule import ShardDataModule
from pipeline.data.digits import load_digits
from pipeline.data.shards import ensure_shards, write_shards

RES = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    cache = tmp_path_factory.mktemp("cache")
    ensure_shards("digits", cache, resolution=RES)
    return str(cache)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def make_dm(cache_dir: str, **overrides) -> ShardDataModule:
    """The digits at 16x16 in batches of 32, one process, 4 batches an epoch; `overrides` change any of it."""
    config = dict(name="digits", source="digits", cache_dir=cache_dir, resolution=RES, channels=1, num_classes=10,
                  batch_size=32, num_workers=0, shuffle_buffer=200, seed=0, batches_per_epoch=4)
    dm = ShardDataModule(**(config | overrides))
    dm.setup("fit")
    return dm


def first_batches(dm: ShardDataModule, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(dm.train_dataloader(), n))


def same(a: list, b: list) -> bool:
    """Equal batches: images, labels and the health records (good and bad samples read before each)."""
    return all(all(torch.equal(u, v) for u, v in zip(ba, bb, strict=True)) for ba, bb in zip(a, b, strict=True))


def test_batches_are_digits_in_range(cache_dir):
    dm = make_dm(cache_dir)
    images, labels = load_digits(RES)
    label_of = {img.tobytes(): int(y) for img, y in zip(images, labels)}
    for raw, y, health in first_batches(dm):
        assert health.tolist() == [32, 0, 0, 0]  # 32 good samples; no bad images, labels or shards
        assert raw.dtype == torch.uint8 and raw.is_contiguous()  # uint8 through the loader: 1/4 of the bytes
        x = dm.on_after_batch_transfer((raw, y, health), 0)[0]  # float on the device
        assert x.shape == (32, 1, RES, RES) and x.dtype == torch.float32
        assert y.shape == (32,) and y.dtype == torch.int64
        assert x.min() == -1.0 and x.max() == 1.0
        pixels = torch.round((x[:, 0] + 1) * 127.5).to(torch.uint8).numpy()  # back to the stored uint8 exactly
        assert [label_of[p.tobytes()] for p in pixels] == y.tolist()


def test_manifest_facts(cache_dir):
    dm = make_dm(cache_dir)
    assert dm.class_names == [str(d) for d in range(10)]
    freq = dm.label_frequencies()
    assert freq.shape == (10,) and torch.isclose(freq.sum(), torch.tensor(1.0))
    _, labels = load_digits(8)
    assert torch.allclose(freq, torch.tensor(np.bincount(labels) / len(labels), dtype=torch.float32))


def test_with_epoch_gives_exactly_batches_per_epoch(cache_dir):
    loader = make_dm(cache_dir, batches_per_epoch=7).train_dataloader()
    assert [sum(1 for _ in loader) for _ in range(2)] == [7, 7]


def test_same_seed_same_stream_other_seed_other_stream(cache_dir):
    assert same(first_batches(make_dm(cache_dir)), first_batches(make_dm(cache_dir)))
    assert not same(first_batches(make_dm(cache_dir)), first_batches(make_dm(cache_dir, seed=1)))


def test_seed_and_epoch_do_not_alias(cache_dir):
    # webdataset's make_seed is linear, so a naive (seed=31, epoch 0) replays (seed=0, epoch 1).
    seed0 = make_dm(cache_dir)
    seed0.start_at(1)
    assert not same(first_batches(make_dm(cache_dir, seed=31)), first_batches(seed0))


def test_ranks_get_different_streams(cache_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    streams = {}
    for rank in ("0", "1", "0"):
        monkeypatch.setenv("RANK", rank)
        streams.setdefault(rank, []).append(first_batches(make_dm(cache_dir)))
    assert same(*streams["0"])
    assert not same(streams["0"][0], streams["1"][0])


def test_epochs_differ_and_resume_replays_the_right_epoch(cache_dir):
    loader = make_dm(cache_dir).train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)
    assert not same(epoch0, epoch1)
    resumed = make_dm(cache_dir)
    resumed.start_at(1)
    assert same(list(resumed.train_dataloader()), epoch1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("trained", [1, 3])
def test_resume_inside_an_epoch_continues_the_stream(cache_dir, workers, trained):
    loader = make_dm(cache_dir, num_workers=workers, batches_per_epoch=5).train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)
    resumed = make_dm(cache_dir, num_workers=workers, batches_per_epoch=5)
    resumed.start_at(0, trained)
    loader = resumed.train_dataloader()
    first = list(itertools.islice(loader, 5 - trained))  # Lightning stops the resumed epoch after the rest
    assert same(first, epoch0[trained:])
    assert same(list(loader), epoch1)  # later epochs are not skipped


def test_workers_get_different_streams(cache_dir):
    dm = make_dm(cache_dir, num_workers=2, batches_per_epoch=4)
    batches = list(dm.train_dataloader())  # the loader takes batches from workers 0, 1, 0, 1
    assert len(batches) == 4
    assert not torch.equal(batches[0][0], batches[1][0])
    assert same(batches, list(make_dm(cache_dir, num_workers=2, batches_per_epoch=4).train_dataloader()))


@pytest.mark.parametrize("key, value, fix", [("num_classes", 5, "data.num_classes=10"),
                                             ("channels", 3, "data.channels=1"),
                                             ("resolution", 32, "data.resolution=16")])
def test_config_manifest_mismatch_names_the_key(cache_dir, key, value, fix):
    shard_dir = f"{cache_dir}/digits-{RES}"  # a gan-shards folder, so resolution is not rewritten to fit
    with pytest.raises(ValueError, match=rf"data\.{key}={value} but the shards in .* set {fix}"):
        make_dm(cache_dir, source=shard_dir, **{key: value})


def test_bad_source_and_bad_values(cache_dir, tmp_path):
    with pytest.raises(ValueError, match="data.source must be 'digits' or a directory written by gan-shards"):
        make_dm(cache_dir, source=str(tmp_path))
    with pytest.raises(ValueError, match="data.batch_size=0"):
        make_dm(cache_dir, batch_size=0)


def test_unconditional_rgb_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    write_shards(str(tmp_path / "src"), tmp_path / "shards", progress=False)
    dm = make_dm(str(tmp_path), source=str(tmp_path / "shards"), resolution=8, channels=3, num_classes=0,
                 batch_size=2)
    x, y, _ = first_batches(dm, 1)[0]
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 0]
    assert dm.class_names == [] and dm.label_frequencies().shape == (0,)


@pytest.mark.parametrize("workers", [0, 2])
def test_per_stage_batch_sizes_follow_the_plan_and_resume_inside_an_epoch(cache_dir, workers):
    # Progressive growing's per-stage batch sizes: global batches 0-2 hold 32, 3-6 hold 16, 7 on 8.
    plan = [(0, 32), (3, 16), (7, 8)]
    loader = make_dm(cache_dir, num_workers=workers, batches_per_epoch=5, batch_plan=plan).train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)
    assert [len(y) for _, y, _ in epoch0 + epoch1] == [32, 32, 32, 16, 16, 16, 16, 8, 8, 8]
    resumed = make_dm(cache_dir, num_workers=workers, batches_per_epoch=5, batch_plan=plan)
    resumed.start_at(0, 3)  # stopped after the three batches of 32: the rest of the epoch is the same
    loader = resumed.train_dataloader()
    assert same(list(itertools.islice(loader, 2)), epoch0[3:])
    assert same(list(loader), epoch1)
    constant = make_dm(cache_dir, num_workers=workers, batches_per_epoch=5, batch_plan=[(0, 32)])
    assert same(first_batches(constant, 3), first_batches(make_dm(cache_dir, num_workers=workers), 3))
