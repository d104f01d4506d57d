"""Checkpoint files: atomic, checksummed writes; a kill during a save; corrupt files; resume=auto's choice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoints import AtomicCheckpointIO, CheckpointError, find_checkpoint, verify_checkpoint
from tests.conftest import ROOT


def _ckpt(value: float, numel: int = 10) -> dict:
    return {"state_dict": {"w": torch.full((numel,), value)}, "counters": {"images_seen": int(value)}}


def _save(path: Path, value: float, numel: int = 10) -> None:
    AtomicCheckpointIO().save_checkpoint(_ckpt(value, numel), path)


def test_save_is_checksummed_and_verifies(tmp_path):
    _save(tmp_path / "last.ckpt", 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no temp files left
    assert torch.equal(verify_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.full((10,), 3.0))
    AtomicCheckpointIO().remove_checkpoint(tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []  # the checksum goes with its checkpoint


def test_failure_during_a_save_keeps_the_previous_file(tmp_path):
    _save(tmp_path / "last.ckpt", 1.0)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")  # fails half-way through torch.save

    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({**_ckpt(2.0), "bad": Unpicklable()}, tmp_path / "last.ckpt")
    assert verify_checkpoint(tmp_path / "last.ckpt")["counters"]["images_seen"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


@pytest.mark.parametrize("crash_at", ["checkpoint_rename", "checksum_rewrite"])
def test_a_crash_between_the_two_renames_leaves_a_verifiable_checkpoint(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "last.ckpt"
    _save(path, 1.0)
    real_replace = os.replace

    def replace(src, dst):
        target = Path(dst).name
        if (crash_at == "checkpoint_rename" and target == "last.ckpt") or (
                crash_at == "checksum_rewrite" and target == "last.ckpt.sha256" and path_is_new()):
            raise OSError("killed")
        real_replace(src, dst)

    path_is_new = lambda: torch.load(path, weights_only=True)["counters"]["images_seen"] == 2  # noqa: E731
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="killed"):
        _save(path, 2.0)
    monkeypatch.undo()
    # Before the checkpoint's rename the old file is there, after it the new one; either verifies.
    expected = 1 if crash_at == "checkpoint_rename" else 2
    assert verify_checkpoint(path)["counters"]["images_seen"] == expected
    _save(path, 3.0)  # and the next save leaves one digest again
    assert len((tmp_path / "last.ckpt.sha256").read_text().splitlines()) == 1
    assert verify_checkpoint(path)["counters"]["images_seen"] == 3


_SAVER = """
import sys, torch
from pathlib import Path
from pipeline.training.checkpoints import AtomicCheckpointIO
io, path, i = AtomicCheckpointIO(), Path(sys.argv[1]), 0
while True:  # back-to-back saves of ~40 MB: a kill almost surely lands inside one
    io.save_checkpoint({"state_dict": {"w": torch.full((10_000_000,), float(i))}, "counters": {"i": i}}, path)
    i += 1
"""


def test_a_process_killed_during_saves_leaves_an_intact_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "last.ckpt.sha256").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into a later save
        temp_files = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.tmp")]  # noqa: E731
        while not temp_files() and time.monotonic() < deadline:  # wait until a save is under way
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert temp_files(), "the kill should have interrupted a save"
    ckpt = verify_checkpoint(path)  # the last complete save, untouched by the interrupted one
    assert torch.equal(ckpt["state_dict"]["w"], torch.full((10_000_000,), float(ckpt["counters"]["i"])))


def test_truncated_and_corrupt_files_are_named(tmp_path):
    path = tmp_path / "last.ckpt"
    _save(path, 1.0)
    data = path.read_bytes()
    path.write_bytes(data[:-200])
    with pytest.raises(CheckpointError, match="last.ckpt: corrupt"):  # checksum
        verify_checkpoint(path)
    (tmp_path / "last.ckpt.sha256").unlink()
    with pytest.raises(CheckpointError, match="last.ckpt: unreadable"):  # no checksum: the zip reader notices
        verify_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not a gan-pipeline training checkpoint"):
        verify_checkpoint(path)


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    for kimg in (1.0, 2.0, 3.0):
        _save(ckpts / f"kimg-{kimg:09.3f}.ckpt", kimg)
    _save(ckpts / "last.ckpt", 4.0)
    assert find_checkpoint("auto", tmp_path / "run") == str(ckpts / "last.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"torn")  # a crash in a write that did not go through AtomicCheckpointIO
    flipped = bytearray((ckpts / "kimg-00003.000.ckpt").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (ckpts / "kimg-00003.000.ckpt").write_bytes(bytes(flipped))
    assert find_checkpoint("auto", tmp_path / "run") == str(ckpts / "kimg-00002.000.ckpt")
    err = capsys.readouterr().err
    assert "skipping" in err and "last.ckpt: corrupt" in err and "kimg-00003.000.ckpt: corrupt" in err
    with pytest.raises(CheckpointError, match="last.ckpt: corrupt"):  # named explicitly: no silent fallback
        find_checkpoint(str(ckpts / "last.ckpt"), tmp_path)
    for p in ckpts.glob("kimg-*.ckpt"):
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 4 checkpoints"):
        find_checkpoint("auto", tmp_path / "run")


def test_resume_path_that_does_not_exist_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match="resume="):
        find_checkpoint(str(tmp_path / "nope"), tmp_path)
    assert find_checkpoint("auto", tmp_path) is None  # nothing to resume: start fresh
    assert find_checkpoint(None, tmp_path) is None
