"""Streaming at scale: disjoint equal streams per rank and worker, remote sources, bad data, horizontal flip."""

import io
import itertools
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.datamodule import ShardDataModule
from pipeline.data.health import DataHealth
from pipeline.data.shards import write_shards
from pipeline.data.stream import DataError, Health

N = 64  # unique 8x8 gray images: image i is constant i * 4 with a mark, and has label i % 4


def image(i: int) -> np.ndarray:
    pixels = np.full((8, 8), i * 4, dtype=np.uint8)
    pixels[0, 0] = 255  # a corner mark: a horizontal flip moves it, so a mirrored image is told from the original
    return pixels


def index_of(x: torch.Tensor) -> int:
    """The image number of a decoded uint8 sample (1, 8, 8)."""
    return int(x[0, 4, 4]) // 4


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("images")
    for i in range(N):
        (src / f"c{i % 4}").mkdir(exist_ok=True)
        Image.fromarray(image(i)).save(src / f"c{i % 4}" / f"{i:03d}.png")
    return src


@pytest.fixture(scope="module")
def many_shards(images, tmp_path_factory) -> Path:
    """16 shards of 4: more shards than 2 ranks x 2 workers, so each stream draws shards of its own."""
    out = tmp_path_factory.mktemp("many") / "ds"
    write_shards(str(images), out, shard_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def one_shard(images, tmp_path_factory) -> Path:
    """One shard of 64: fewer shards than streams, so streams split the samples inside it."""
    out = tmp_path_factory.mktemp("one") / "ds"
    write_shards(str(images), out, shard_size=N, progress=False)
    return out


def make_dm(source, **overrides) -> ShardDataModule:
    config = dict(name="t", source=str(source), cache_dir="unused", resolution=8, channels=1, num_classes=4,
                  batch_size=4, num_workers=0, shuffle_buffer=8, seed=0, batches_per_epoch=4)
    dm = ShardDataModule(**(config | overrides))
    dm.setup("fit")
    return dm


def same(a: list, b: list) -> bool:
    return all(all(torch.equal(u, v) for u, v in zip(ba, bb, strict=True)) for ba, bb in zip(a, b, strict=True))


@pytest.mark.parametrize("dataset", ["many_shards", "one_shard"])
def test_two_ranks_by_two_workers_read_disjoint_data_in_equal_counts(dataset, request, monkeypatch):
    source = request.getfixturevalue(dataset)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen, counts = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = make_dm(source, num_workers=2, batches_per_epoch=6).train_dataloader()
        for epoch in range(2):
            batches = list(loader)
            counts[rank, epoch] = len(batches)
            for i, (x, y, _) in enumerate(batches):  # the loader takes batch i from worker i % 2
                ids = [index_of(s) for s in x]
                assert [k % 4 for k in ids] == y.tolist()  # labels travel with their images
                seen.setdefault((rank, i % 2), set()).update(ids)
    assert set(counts.values()) == {6}  # every rank the same number of batches in every epoch
    streams = list(seen.values())
    assert len(streams) == 4 and all(streams)
    for a, b in itertools.combinations(streams, 2):
        assert not a & b  # no image is read by two streams
    if dataset == "many_shards":  # whole shards per stream: stream s draws only shards s, s + 4, s + 8, ...
        shard_of = {}
        for n, shard in enumerate(sorted(source.glob("shard-*.tar"))):
            for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
                shard_of[int(np.asarray(Image.open(io.BytesIO(sample["png"])))[4, 4]) // 4] = n
        owners = [{shard_of[k] % 4 for k in s} for s in seen.values()]
        assert all(len(o) == 1 for o in owners) and len(set.union(*owners)) == 4


def copy_to(fs, local: Path, root: str) -> None:
    for path in local.iterdir():
        fs.pipe(f"{root}/{path.name}", path.read_bytes())


def test_fsspec_memory_and_file_urls_and_a_pipe_command_stream_what_the_folder_streams(many_shards):
    fs = fsspec.filesystem("memory")
    root = f"/ds-{uuid.uuid4().hex[:8]}"
    copy_to(fs, many_shards, root)
    try:
        local = list(make_dm(many_shards).train_dataloader())
        assert same(list(make_dm(f"memory://{root}").train_dataloader()), local)
        assert same(list(make_dm(f"file://{many_shards}").train_dataloader()), local)
        assert same(list(make_dm(f"pipe:cat {many_shards}/{{name}}").train_dataloader()), local)
    finally:
        fs.rm(root, recursive=True)
    with pytest.raises(ValueError, match=r"data.source='memory://nowhere' has no manifest.json"):
        make_dm("memory://nowhere")


def rewrite_shard(shard: Path, change) -> None:
    """Rewrite one shard sample by sample; change(index, sample) returns the sample to write, or None to drop it."""
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for i, sample in enumerate(samples):
            out = change(i, {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
            if out is not None:
                sink.write(out)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def corrupt(i: int, sample: dict) -> dict:
    """Sample 0: bytes that are no image; 1: no label; 2: label 9 of 4 classes; 3: a 16x16 image; 4+ intact."""
    if i == 0:
        sample["png"] = b"not a png" * 10
    elif i == 1:
        del sample["cls"]
    elif i == 2:
        sample["cls"] = b"9"
    elif i == 3:
        sample["png"] = png(np.zeros((16, 16), np.uint8))
    return sample


def copy_dataset(src: Path, out: Path) -> Path:
    out.mkdir()
    for path in src.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def stream_totals(dm: ShardDataModule) -> tuple[list[int], set[int]]:
    """Health totals (good, bad images, bad labels, bad shards) over an epoch, and the images that came through."""
    totals, ids = torch.zeros(4, dtype=torch.long), set()
    for x, y, health in dm.train_dataloader():
        totals += health
        assert x.shape == (dm.batch_size, 1, 8, 8)
        assert [index_of(s) % 4 for s in x] == y.tolist()  # every image that gets through has its own label
        ids.update(index_of(s) for s in x)
    return totals.tolist(), ids


def test_bad_images_and_labels_are_skipped_and_counted(one_shard, tmp_path, capsys):
    out = copy_dataset(one_shard, tmp_path / "ds")
    rewrite_shard(out / "shard-000000.tar", corrupt)
    (ok, bad_image, bad_label, bad_shard), ids = stream_totals(make_dm(out, batch_size=8, batches_per_epoch=40,
                                                                       max_bad_fraction=0.1))
    # 320 good samples in batches: 5 passes over the shard's 60 good ones, each pass skipping 2 images (no image,
    # 16x16) and 2 labels (missing, 9 of 4); the shuffle buffer holds back at most 8 read samples.
    assert ok >= 320 and bad_shard == 0
    assert bad_image == bad_label and 2 * (ok // 60) <= bad_image <= 2 * (-(-(ok + 8) // 60))
    assert len(ids) == N - 4  # the four damaged samples never reach a batch
    err = capsys.readouterr().err
    assert "skipped bad image" in err and "not a png" not in err and "skipped bad label" in err


def test_a_truncated_shard_keeps_its_readable_part_and_counts_once_per_read(one_shard, tmp_path, capsys):
    out = copy_dataset(one_shard, tmp_path / "ds")
    data = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(data[: len(data) // 2])  # cut off in the middle of the tar
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"].append(dict(manifest["shards"][0], name="shard-000001.tar"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    (ok, bad_image, bad_label, bad_shard), ids = stream_totals(make_dm(out, batch_size=8, batches_per_epoch=40,
                                                                       max_bad_fraction=0.2))
    # The sample cut in half is dropped with its shard, not counted again as a bad image.
    assert bad_image == bad_label == 0 and bad_shard >= 1 and len(ids) == N
    assert "skipped bad shard" in capsys.readouterr().err


def test_a_worker_that_reads_only_bad_data_stops_with_the_fix(tmp_path, one_shard):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "manifest.json").write_text((one_shard / "manifest.json").read_text())
    (out / "shard-000000.tar").write_bytes(b"\0" * 100)  # not a tar at all: nothing would ever make a batch
    with pytest.raises(DataError, match=r"100 of 100 samples read were bad .*data.max_bad_fraction=0.01.*gan-shards "
                                        r"verify"):
        next(iter(make_dm(out).train_dataloader()))


class FakeTrainer:
    is_global_zero = True
    log_every_n_steps = 1  # judged after every batch


class FakeModule:
    def __init__(self):
        self.logged = {}

    def log_dict(self, values, **kwargs):
        self.logged = values


def test_the_run_stops_once_bad_data_passes_the_threshold_counted_over_enough_samples():
    callback, module = DataHealth(max_bad_fraction=0.01, source="ds"), FakeModule()
    step = lambda ok, bad: callback.on_train_batch_end(FakeTrainer(), module, None,  # noqa: E731
                                                       (None, None, torch.tensor([ok, bad, 0, 0])), 0)
    step(90, 10)  # 10% bad, but only 100 samples read: not judged yet
    assert module.logged["data/bad_fraction"] == pytest.approx(0.1) and module.logged["data/bad_image"] == 10
    for _ in range(8):
        step(100, 0)
    step(100, 0)  # 1,000 read, 10 bad: exactly 1%, not more
    with pytest.raises(DataError, match=r"11 of 1001 samples read were bad"):
        step(0, 1)
    resumed = DataHealth(max_bad_fraction=0.01, source="ds")
    resumed.load_state_dict(callback.state_dict())  # a resumed run goes on counting from the checkpoint
    assert resumed.totals == callback.totals


def test_counts_are_read_and_judged_only_every_log_every_n_steps_batches():
    trainer, module = FakeTrainer(), FakeModule()
    trainer.log_every_n_steps = 5  # the host reads the counts (a GPU sync) only on logging steps
    callback = DataHealth(max_bad_fraction=0.01, source="ds")
    for i in range(4):
        callback.on_train_batch_end(trainer, module, None, (None, None, torch.tensor([250, 10, 0, 0])), i)
    assert module.logged == {} and callback.totals["bad_image"] == 40  # counted, not yet judged
    with pytest.raises(DataError, match=r"50 of 1300 samples read were bad"):
        callback.on_train_batch_end(trainer, module, None, (None, None, torch.tensor([250, 10, 0, 0])), 4)


def test_worker_guard_judges_only_after_enough_samples():
    health = Health(0.01, "ds")
    for _ in range(Health.JUDGE_AFTER - 20):
        health.good()
    for _ in range(19):
        health.bad("bad_image", "here", "why")  # 19 of 999: not yet judged
    with pytest.raises(DataError):
        health.bad("bad_image", "here", "why")  # 20 of 1000 > 1%


def test_hflip_mirrors_about_half_the_images_and_resumes_exactly(many_shards):
    plain = list(make_dm(many_shards, batches_per_epoch=32).train_dataloader())
    flipped = list(make_dm(many_shards, batches_per_epoch=32, hflip=True).train_dataloader())
    mirrored = 0
    for (xa, ya, _), (xb, yb, _) in zip(plain, flipped, strict=True):
        assert torch.equal(ya, yb)  # the same samples in the same order: the flip draws from its own RNG
        for a, b in zip(xa, xb):
            assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
            mirrored += not torch.equal(a, b)
    assert 0.3 < mirrored / (32 * 4) < 0.7  # Binomial(128, 1/2): 0.5 +- 0.044
    resumed = make_dm(many_shards, batches_per_epoch=32, hflip=True)
    resumed.start_at(0, 5)
    assert same(list(itertools.islice(resumed.train_dataloader(), 32 - 5)), flipped[5:])  # Lightning stops it there


def test_max_bad_fraction_is_checked(many_shards):
    with pytest.raises(ValueError, match=r"data.max_bad_fraction=1.5 must be in \[0, 1\)"):
        make_dm(many_shards, max_bad_fraction=1.5)
