"""gan-train on shards with undecodable images: skipped, counted in W&B, and a stop above the threshold that
every rank takes at the same step."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.data.shards import ensure_shards
from tests.conftest import ROOT, TINY, wandb_records

EVERY = 25  # every 25th sample of the first shard (1,000 of the 1,797 digits) does not decode: 40 bad images


@pytest.fixture(scope="module")
def damaged(shard_cache, tmp_path_factory) -> Path:
    good = ensure_shards("digits", shard_cache, resolution=32)
    out = tmp_path_factory.mktemp("damaged") / "digits"
    out.mkdir()
    for path in good.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(good / "shard-000000.tar")]), wds.tarfile_to_samples()))
    with wds.TarWriter(str(out / "shard-000000.tar"), encoder=False) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": sample["__key__"], "cls": sample["cls"],
                        "png": b"\x89PNG broken" if i % EVERY == 0 else sample["png"]})
    return out


def gan_train(args: list[str], torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(29500 + os.getpid() % 1000)] if torchrun else []
    return subprocess.run([sys.executable, *launcher, "-m", "pipeline.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def data_args(damaged: Path, tmp_path: Path, name: str) -> list[str]:
    return [*TINY, "data=folder", f"data.source={damaged}", "data.resolution=32", "data.channels=1",
            "data.num_classes=10", "data.batch_size=32", f"paths.output_dir={tmp_path}", f"run.name={name}"]


def test_bad_images_are_skipped_and_logged_and_too_many_stop_the_run(damaged, tmp_path):
    ok = gan_train(data_args(damaged, tmp_path, "tolerant") + ["train.kimg=1.28", "data.max_bad_fraction=0.1",
                                                                "logger.mode=offline"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "gan-train: data: skipped bad image" in ok.stderr  # the first few, with shard and key
    assert re.search(r"gan-train: data: skipped [1-9]\d* of \d+ samples read \([1-9]\d* bad images, 0 bad labels",
                     ok.stderr)  # the run's total at the end
    last = [r for r in wandb_records(tmp_path / "tolerant") if "data/bad_image" in r][-1]
    read = last["data/ok"] + last["data/bad_image"]
    assert last["data/ok"] >= 1280 - 32 and last["data/bad_label"] == last["data/bad_shard"] == 0
    # 1 in 25 of the first shard's samples, and that shard holds 1,000 of 1,797: about 2.2% of what is read.
    assert 0.005 < last["data/bad_image"] / read < 0.05
    assert abs(last["data/bad_fraction"] - last["data/bad_image"] / read) < 1e-6

    strict = gan_train(data_args(damaged, tmp_path, "strict") + ["train.kimg=3", "data.max_bad_fraction=0.005",
                                                                 "~logger"])
    assert strict.returncode == 5, strict.stderr[-3000:]  # 4 is a lost peer
    message = strict.stderr.strip().splitlines()[-1]
    assert message.startswith("gan-train: data error: ") and "more than data.max_bad_fraction=0.005" in message
    assert f"gan-shards verify {damaged}" in message


@pytest.mark.distributed
def test_two_ranks_stop_together_when_one_reads_the_bad_shard(damaged, tmp_path):
    # Two shards, two ranks: rank 0 reads only the damaged shard, rank 1 only the intact one. Rank 1 alone would
    # never stop; the all-reduced counts stop both at the same step, so neither waits for the other.
    proc = gan_train(data_args(damaged, tmp_path, "ddp") + ["train.kimg=3", "data.max_bad_fraction=0.01",
                                                            "~logger"], torchrun=True)
    assert proc.returncode != 0
    assert proc.stderr.count("gan-train: data error: ") == 2, proc.stderr[-3000:]
    assert "Timeout" not in proc.stderr and "timed out" not in proc.stderr
