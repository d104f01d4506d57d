"""gan-shards: round trip, reproducibility, folder sources and the errors a user can hit."""

import hashlib
import io
import json
import multiprocessing
import shlex
import tarfile
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.data import storage
from pipeline.data.digits import load_digits
from pipeline.data.shards import (
    DatasetError,
    ensure_shards,
    iterate_shards,
    main,
    read_manifest,
    write_shards,
)
from pipeline.data.verify import verify_shards


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


# --- labels files, ZIPs, geometry, formats, workers, URLs, verify ---------------------------------------------------

def _colour_labels(location) -> dict[int, int]:
    """Red channel of pixel (0, 0) -> label: each test image has its own red value."""
    return {int(img[0, 0, 0]): y for _, img, y in iterate_shards(location)}


@pytest.fixture
def flat(tmp_path) -> Path:
    """Three images, one in a sub-folder, with red values 10, 20, 30."""
    for name, value in [("a.png", 10), ("b.png", 20), ("sub/c.png", 30)]:
        _png(tmp_path / "flat" / name, "RGB", (8, 8), value)
    return tmp_path / "flat"


def test_flat_folder_with_csv_labels(flat, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\na.png,dog\n\nb.png, cat\nsub/c.png,dog\n")
    manifest = write_shards(str(flat), tmp_path / "out", labels=labels, progress=False)
    assert manifest["classes"] == {"cat": 0, "dog": 1} and manifest["class_counts"] == {"0": 1, "1": 2}
    assert manifest["labels_file"] == str(labels) and manifest["num_unlabelled"] == 0
    assert _colour_labels(tmp_path / "out") == {10: 1, 20: 0, 30: 1}


@pytest.mark.parametrize("content, classes, expected", [
    ({"a.png": 7, "b.png": 3, "sub/c.png": 7}, {"3": 0, "7": 1}, {10: 1, 20: 0, 30: 1}),  # ints remapped in order
    ([["a.png", 1], ["b.png", 0], ["./sub/c.png", 2]], {"0": 0, "1": 1, "2": 2}, {10: 1, 20: 0, 30: 2}),  # 0..K-1 kept
    ({"labels": [["a.png", "x"], ["b.png", "y"], ["sub/c.png", "x"]]}, {"x": 0, "y": 1}, {10: 0, 20: 1, 30: 0}),
], ids=["object", "pairs", "dataset.json"])
def test_flat_folder_with_json_labels(flat, tmp_path, content, classes, expected):
    (tmp_path / "labels.json").write_text(json.dumps(content))
    manifest = write_shards(str(flat), tmp_path / "out", labels=tmp_path / "labels.json", progress=False)
    assert manifest["classes"] == classes
    assert _colour_labels(tmp_path / "out") == expected


@pytest.mark.parametrize("setup, message", [
    ("a.png,cat\nb.png,\nsub/c.png,dog\n", r"labels\.csv line 2: no label for b\.png"),
    ("a.png,cat\nb.png,dog\nsub/c.png,cat\nnope.png,dog\n",
     r"1 file\(s\) listed in labels\.csv do not exist .*nope\.png \(labels\.csv line 4\)"),
    ("file,label\na.png,cat\nb.png,dog\nsub/c.png,cat\n", r"file \(labels\.csv line 1\).*header row must be exactly"),
    ("a.png,cat\n", r"2 image\(s\) .* not in labels\.csv, e\.g\. b\.png, sub/c\.png; add them to labels\.csv.*"
                    r"--unlabelled skip"),
    ("a.png,cat\nb.png,dog\na.png,dog\nsub/c.png,cat\n", r"line 3: a\.png is listed twice \(also labels\.csv line 1\)"),
    ("a.png,cat,extra\n", r"line 1: expected `filename,label`, got 3 fields"),
    ("../a.png,cat\n", r"line 1: '\.\./a\.png' is not a file name relative to"),
    ({"a.png": "cat", "b.png": 1, "sub/c.png": "cat"}, "mix integers and class names"),
    ({"a.png": "cat", "b.png": None, "sub/c.png": "cat"}, r"entry 'b\.png': no label for b\.png"),
    ({"a.png": 1.5, "b.png": 1, "sub/c.png": 1}, r"label 1\.5 for a\.png is not a class name or an integer"),
    ([["a.png"]], r"item 0: expected \[filename, label\]"),
    ("{broken", "not valid JSON"),
])
def test_bad_labels_file(flat, tmp_path, setup, message):
    is_csv = isinstance(setup, str) and not setup.startswith("{")
    labels = tmp_path / ("labels.csv" if is_csv else "labels.json")
    labels.write_text(setup if isinstance(setup, str) else json.dumps(setup))
    with pytest.raises(DatasetError, match=message):
        write_shards(str(flat), tmp_path / "out", labels=labels, progress=False)
    assert not (tmp_path / "out").exists()


def test_unlabelled_skip_leaves_images_out(flat, tmp_path):
    (tmp_path / "labels.csv").write_text("b.png,cat\n")
    manifest = write_shards(str(flat), tmp_path / "out", labels=tmp_path / "labels.csv", unlabelled="skip",
                            progress=False)
    assert manifest["num_samples"] == 1 and manifest["num_unlabelled"] == 2
    assert _colour_labels(tmp_path / "out") == {20: 0}


def _stylegan_zip(path: Path, labels) -> Path:
    """A ZIP laid out like NVlabs dataset_tool.py output: 00000/img%08d.png plus dataset.json."""
    with zipfile.ZipFile(path, "w") as zf:
        for i, value in enumerate([10, 20, 30, 40]):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
            zf.writestr(f"{i // 2:05d}/img{i:08d}.png", buf.getvalue())
        if labels != "absent":
            zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


@pytest.mark.parametrize("labels", [[[f"{i // 2:05d}/img{i:08d}.png", [1, 0, 2, 1][i]] for i in range(4)], None,
                                    "absent"], ids=["labels", "null", "no-dataset.json"])
def test_stylegan_zip(tmp_path, labels):
    source = _stylegan_zip(tmp_path / "ds.zip", labels)
    manifest = write_shards(str(source), tmp_path / "out", progress=False, workers=2)
    if labels is None or labels == "absent":
        assert manifest["classes"] == {} and _colour_labels(tmp_path / "out") == {10: 0, 20: 0, 30: 0, 40: 0}
    else:
        assert manifest["classes"] == {"0": 0, "1": 1, "2": 2}
        assert _colour_labels(tmp_path / "out") == {10: 1, 20: 0, 30: 2, 40: 1}


def test_zip_errors(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"cannot read ZIP .*junk\.zip"):
        write_shards(str(tmp_path / "junk.zip"), tmp_path / "out", progress=False)
    source = _stylegan_zip(tmp_path / "ds.zip", [["00000/img00000000.png", 0]])
    with pytest.raises(DatasetError, match=r"3 image\(s\) .* not in dataset\.json"):
        write_shards(str(source), tmp_path / "out", progress=False)


def test_fit_pad_and_crop(tmp_path):
    wide = np.zeros((4, 8, 3), np.uint8)  # (H, W, 3): blue edges two columns wide, a green 4x4 middle
    wide[:, :, 2] = 255
    wide[:, 2:6] = (0, 255, 0)
    (tmp_path / "src").mkdir()
    Image.fromarray(wide).save(tmp_path / "src" / "wide.png")
    cropped = write_shards(str(tmp_path / "src"), tmp_path / "crop", resolution=4, progress=False)
    padded = write_shards(str(tmp_path / "src"), tmp_path / "pad", resolution=8, fit="pad", progress=False)
    assert (cropped["fit"], padded["fit"]) == ("crop", "pad")
    [(_, crop, _)] = iterate_shards(tmp_path / "crop")
    [(_, pad, _)] = iterate_shards(tmp_path / "pad")
    assert (crop == (0, 255, 0)).all()  # the centre kept, the blue edges cut off
    assert (pad[:2] == 0).all() and (pad[6:] == 0).all()  # black bars above and below
    np.testing.assert_array_equal(pad[2:6], wide)  # the whole image in between


def _smooth(path: Path) -> np.ndarray:
    y, x = np.mgrid[:32, :32]
    pixels = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_jpg_round_trip_and_old_manifests(tmp_path):
    _smooth(tmp_path / "src" / "smooth.png")
    write_shards(str(tmp_path / "src"), tmp_path / "png", progress=False)
    manifest = write_shards(str(tmp_path / "src"), tmp_path / "jpg", image_format="jpg", progress=False)
    assert (manifest["image_format"], manifest["quality"]) == ("jpg", 95)
    with tarfile.open(tmp_path / "jpg" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["00000000.cls", "00000000.jpg"]
    [(_, png, _)] = iterate_shards(tmp_path / "png")
    [(_, jpg, _)] = iterate_shards(tmp_path / "jpg")
    assert jpg.shape == png.shape and 0 < np.abs(jpg.astype(int) - png).mean() < 3
    old = json.loads((tmp_path / "png" / "manifest.json").read_text())
    del old["image_format"], old["fit"], old["quality"]  # as written before these keys existed
    (tmp_path / "png" / "manifest.json").write_text(json.dumps(old))
    assert read_manifest(tmp_path / "png")["image_format"] == "png"
    assert verify_shards(tmp_path / "png") == [] and len(list(iterate_shards(tmp_path / "png"))) == 1


def test_workers_give_identical_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(24):
        size = (10, 7) if i % 2 else (7, 10)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{'ab'[i % 3 > 0]}{i}.png")
    for label in "ab":
        (tmp_path / "src" / label).mkdir(parents=True)
        for path in tmp_path.glob(f"{label}*.png"):
            path.rename(tmp_path / "src" / label / path.name)
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"garbage")
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"out{workers}"
        write_shards(str(tmp_path / "src"), outs[workers], resolution=6, fit="pad", shard_size=5, skip_bad=True,
                     workers=workers, progress=False)
    names = sorted(p.name for p in outs[1].iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in outs[2].iterdir())
    for name in names:
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name


@pytest.fixture
def memory_url():
    root = f"/gan-shards-test-{uuid.uuid4().hex}"
    yield f"memory:/{root}/ds"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_round_trip(class_folder, tmp_path, memory_url):
    local = write_shards(str(class_folder), tmp_path / "local", shard_size=2, progress=False)
    remote = write_shards(str(class_folder), memory_url, shard_size=2, progress=False)
    assert remote == local and read_manifest(memory_url + "/manifest.json") == local
    assert storage.list_names(memory_url) == ["manifest.json"] + [s["name"] for s in local["shards"]]
    assert verify_shards(memory_url) == []
    got, want = list(iterate_shards(memory_url)), list(iterate_shards(tmp_path / "local"))
    assert [(k, y) for k, _, y in got] == [(k, y) for k, _, y in want]
    assert all((a[1] == b[1]).all() for a, b in zip(got, want))
    with pytest.raises(DatasetError, match="already holds a dataset; pass --overwrite"):
        write_shards(str(class_folder), memory_url, progress=False)
    write_shards(str(class_folder), memory_url, shard_size=5, overwrite=True, progress=False)
    assert storage.list_names(memory_url) == ["manifest.json", "shard-000000.tar"]  # the old shards are gone
    assert main(["verify", memory_url]) == 0


def test_url_with_foreign_files_is_refused(class_folder, memory_url):
    with fsspec.open(memory_url + "/thesis.tex", "wb") as f:
        f.write(b"precious")
    with pytest.raises(DatasetError, match="files gan-shards did not write, such as thesis.tex"):
        write_shards(str(class_folder), memory_url, overwrite=True, progress=False)
    assert storage.list_names(memory_url) == ["thesis.tex"]


def test_read_through_manifest_path_and_pipe(digits16):
    pipe = f"pipe:cat {shlex.quote(str(digits16))}/{{name}}"
    assert read_manifest(digits16 / "manifest.json") == read_manifest(pipe) == read_manifest(digits16)
    first = next(iterate_shards(pipe))
    assert first[0] == "00000000" and first[1].shape == (16, 16)
    assert verify_shards(pipe) == []


def test_verify_finds_bad_shards(class_folder, tmp_path, capsys):
    out = tmp_path / "out"
    write_shards(str(class_folder), out, shard_size=2, progress=False)
    assert main(["verify", str(out)]) == 0 and "all 3 shards good" in capsys.readouterr().out
    shard0 = bytearray((out / "shard-000000.tar").read_bytes())
    shard0[700] ^= 0xFF  # inside the first member's data: the tar still reads, the checksum does not match
    (out / "shard-000000.tar").write_bytes(bytes(shard0))
    (out / "shard-000001.tar").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][2]["num_samples"] += 1
    manifest["num_samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shard-000000.tar: sha256 ") and "differs from the manifest" in lines[0]
    assert lines[1] == "shard-000001.tar: missing"
    assert lines[2] == "shard-000002.tar: 1 samples, the manifest says 2"
    assert lines[3].endswith("3 of 3 shards bad (6 samples in the manifest)")
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_new_flags(tmp_path, capsys):
    source = _stylegan_zip(tmp_path / "ds.zip", None)
    assert main([str(source), str(tmp_path / "out"), "--format", "jpg", "--quality", "90", "--fit", "pad",
                 "--resolution", "4", "--workers", "2"]) == 0
    assert "wrote 4 images (0 classes, 4x4 RGB, jpg q90) in 1 shards" in capsys.readouterr().out
    (tmp_path / "labels.csv").write_text("img.png,\n")
    for bad in (["--labels", str(tmp_path / "labels.csv")], ["--workers", "0"], ["--quality", "0"]):
        assert main([str(source), str(tmp_path / "out2"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gan-shards: error:") and err.count("\n") == 1, err


def test_failed_url_write_removes_its_shards(class_folder, memory_url, monkeypatch):
    _truncated_png(class_folder / "dog" / "truncated.png")  # found only on full decode, after some uploads
    uploads = []
    put_file = storage.put_file
    monkeypatch.setattr(storage, "put_file", lambda *args: (uploads.append(args[2]), put_file(*args)))
    with pytest.raises(DatasetError, match=r"dog/truncated\.png"):
        write_shards(str(class_folder), memory_url, shard_size=1, progress=False)
    assert uploads and storage.list_names(memory_url) == []
