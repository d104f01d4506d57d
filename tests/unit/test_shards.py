"""gan-shards: round trip, reproducibility, folder sources and the errors a user can hit."""

import hashlib
import json
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.digits import load_digits
from pipeline.data.shards import DatasetError, ensure_shards, iterate_shards, main, read_manifest, write_shards


@pytest.fixture(scope="module")
def digits16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits16"
    write_shards("digits", out, resolution=16, shard_size=500, progress=False)
    return out


def _png(path: Path, mode: str, size: tuple[int, int], value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "P") else (value, 255 - value, value // 2)[: len(mode)]
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    root = tmp_path / "pets"
    for i in range(3):
        _png(root / "cat" / f"{i}.png", "RGB", (8, 8), 10 * i)
    for i in range(2):
        _png(root / "dog" / f"{i}.png", "RGB", (8, 8), 100 + 10 * i)
    (root / "dog" / "notes.txt").write_text("not an image")  # ignored, not an error
    return root


def test_digits_round_trip(digits16):
    manifest = read_manifest(digits16)
    assert [s["num_samples"] for s in manifest["shards"]] == [500, 500, 500, 297]
    assert manifest["num_samples"] == 1797
    assert (manifest["resolution"], manifest["channels"], manifest["mode"]) == (16, 1, "L")
    assert manifest["classes"] == {str(d): d for d in range(10)} and manifest["num_classes"] == 10
    for shard in manifest["shards"]:
        with tarfile.open(digits16 / shard["name"]) as tar:
            names = tar.getnames()
            assert sorted(names) == sorted(f"{key}.{ext}" for key in {n.split(".")[0] for n in names}
                                           for ext in ("cls", "png"))
            assert len(names) == 2 * shard["num_samples"]
            assert all(m.mtime == 0 for m in tar.getmembers())
    images, labels = load_digits(16)
    samples = list(iterate_shards(digits16))
    assert [key for key, _, _ in samples] == [f"{i:08d}" for i in range(1797)]
    np.testing.assert_array_equal(np.stack([img for _, img, _ in samples]), images)
    np.testing.assert_array_equal(np.array([y for _, _, y in samples]), labels)
    assert manifest["class_counts"] == {str(d): int((labels == d).sum()) for d in range(10)}


def test_checksums_match(digits16):
    for shard in read_manifest(digits16)["shards"]:
        assert hashlib.sha256((digits16 / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]


def test_writing_twice_gives_identical_bytes(digits16, tmp_path):
    again = tmp_path / "again"
    write_shards("digits", again, resolution=16, shard_size=500, progress=False)
    for path in sorted(digits16.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_class_folders(class_folder, tmp_path):
    manifest = write_shards(str(class_folder), tmp_path / "out", progress=False)
    assert manifest["classes"] == {"cat": 0, "dog": 1} and manifest["num_classes"] == 2
    assert manifest["class_counts"] == {"0": 3, "1": 2}
    assert (manifest["resolution"], manifest["channels"], manifest["mode"]) == (8, 3, "RGB")
    # Written in a fixed shuffled order; each image keeps its label and its pixels.
    colour_label = {tuple(img[0, 0]): y for _, img, y in iterate_shards(tmp_path / "out")}
    assert colour_label == {(0, 255, 0): 0, (10, 245, 5): 0, (20, 235, 10): 0, (100, 155, 50): 1, (110, 145, 55): 1}


def test_folder_shards_mix_classes(tmp_path):
    for label in ("a", "b"):
        for i in range(20):
            _png(tmp_path / "src" / label / f"{i:02d}.png", "L", (4, 4), i)
    write_shards(str(tmp_path / "src"), tmp_path / "out", shard_size=10, progress=False)
    labels = [y for _, _, y in iterate_shards(tmp_path / "out")]
    assert sorted(labels) == [0] * 20 + [1] * 20
    assert all(set(labels[i:i + 10]) == {0, 1} for i in range(0, 40, 10))  # every shard holds both classes


def test_classless_folder_is_unconditional(tmp_path):
    for i in range(3):
        _png(tmp_path / "src" / f"{i}.png", "L", (6, 6), 40 * i)
    manifest = write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert manifest["num_classes"] == 0 and manifest["classes"] == {} and manifest["mode"] == "L"
    assert [y for _, _, y in iterate_shards(tmp_path / "out")] == [0, 0, 0]


def test_resolution_center_crops_and_resizes(tmp_path):
    _png(tmp_path / "src" / "wide.png", "RGB", (12, 6), 50)
    _png(tmp_path / "src" / "tall.png", "RGB", (5, 9), 60)
    with pytest.raises(DatasetError, match="--resolution"):
        write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)
    write_shards(str(tmp_path / "src"), tmp_path / "out", resolution=4, progress=False)
    assert {img.shape for _, img, _ in iterate_shards(tmp_path / "out")} == {(4, 4, 3)}


def _truncated_png(path: Path) -> None:
    """A valid header with a cut-off pixel stream: only a full decode notices."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-60])


@pytest.mark.parametrize("truncated", [False, True])
def test_corrupt_file_names_it_and_leaves_nothing(class_folder, tmp_path, truncated):
    if truncated:
        _truncated_png(class_folder / "dog" / "broken.png")
    else:
        (class_folder / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"dog/broken\.png.*--skip-bad"):
        write_shards(str(class_folder), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_skip_bad_counts_skipped_files(class_folder, tmp_path):
    (class_folder / "cat" / "broken.png").write_bytes(b"garbage")
    _truncated_png(class_folder / "dog" / "truncated.png")
    manifest = write_shards(str(class_folder), tmp_path / "out", skip_bad=True, progress=False)
    assert manifest["skipped"] == ["cat/broken.png", "dog/truncated.png"] and manifest["num_skipped"] == 2
    assert manifest["num_samples"] == 5


def test_mixed_modes_error_and_forced_mode(tmp_path):
    _png(tmp_path / "src" / "gray.png", "L", (8, 8), 30)
    _png(tmp_path / "src" / "colour.png", "RGB", (8, 8), 30)
    with pytest.raises(DatasetError, match=r"mixed modes.*--mode L\|RGB"):
        write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert write_shards(str(tmp_path / "src"), tmp_path / "out", mode="L", progress=False)["channels"] == 1


def test_gray_palette_counts_as_grayscale(tmp_path):
    im = Image.new("P", (8, 8), 3)
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    (tmp_path / "src").mkdir()
    im.save(tmp_path / "src" / "p.png")
    _png(tmp_path / "src" / "l.png", "L", (8, 8), 30)
    assert write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)["mode"] == "L"


@pytest.mark.parametrize("setup, message", [("empty", "is empty"), ("text", "no images found")])
def test_folder_without_images(tmp_path, setup, message):
    (tmp_path / "src").mkdir()
    if setup == "text":
        (tmp_path / "src" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=message):
        write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gan-shards: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_refuses_to_overwrite(class_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(class_folder), str(out)]) == 0
    assert "wrote 5 images (2 classes, 8x8 RGB) in 1 shards" in capsys.readouterr().out
    assert main([str(class_folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(class_folder), str(out), "--overwrite", "--resolution", "4"]) == 0
    assert read_manifest(out)["resolution"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["out", "pets"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert main([str(class_folder), str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DatasetError, match="missing"):
        read_manifest(tmp_path)


def test_ensure_shards(digits16, tmp_path):
    assert ensure_shards(str(digits16), tmp_path, resolution=99) == digits16
    with pytest.raises(ValueError, match="data.source must be 'digits' or a directory written by gan-shards"):
        ensure_shards(str(tmp_path), tmp_path, resolution=16)
    first = ensure_shards("digits", tmp_path / "cache", resolution=8)
    assert first == tmp_path / "cache" / "digits-8" and read_manifest(first)["resolution"] == 8
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert ensure_shards("digits", tmp_path / "cache", resolution=8) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # found, not rewritten


def _ensure_in_child(cache: str, queue) -> None:
    queue.put(str(ensure_shards("digits", cache, resolution=8)))


def test_ensure_shards_from_two_processes_at_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert {queue.get(), queue.get()} == {str(tmp_path / "digits-8")}
    assert read_manifest(tmp_path / "digits-8")["num_samples"] == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == [".digits-8.lock", "digits-8"]
