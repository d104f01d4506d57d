"""Faults with several processes: two nodes on 127.0.0.1 that restart after a killed worker, a hung peer
that fails the run after strategy.timeout_s, SIGTERM on one rank, and a resumed stream on 2 ranks x 2 workers."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoints import verify_checkpoint
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.distributed

ENV = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _common(tmp_path: Path, shard_cache: str, name: str) -> list[str]:
    return TINY + ["~logger", f"paths.output_dir={tmp_path}", f"paths.cache_dir={shard_cache}", f"run.name={name}",
                   "train.sample_every_kimg=100"]


def _pids_with(env_key: str, value: str, marker: str) -> list[int]:
    """Processes whose environment has `env_key=value` and the test's marker variable."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"{env_key}={value}".encode() in environ and f"GAN_TEST_MARKER={marker}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_two_nodes_restart_after_a_killed_worker_stop_on_sigterm_and_resume(tmp_path, shard_cache):
    # gan-launch local: two torchrun agents (--nnodes 2 --node-rank 0/1, master 127.0.0.1), one worker each.
    # 1. The worker of node 1 is killed after the first periodic checkpoint: both agents restart their
    #    workers (--max-restarts 1), which resume from last.ckpt.
    # 2. SIGTERM to the launcher (as Kubernetes sends it to a pod's torchrun): the agents pass it on, the
    #    workers write last.ckpt and exit.
    # 3. The same command again finishes the run.
    marker = str(tmp_path)
    args = [sys.executable, "-m", "launch.cli", "local", "--nodes", "2", "--max-restarts", "1",
            *_common(tmp_path, shard_cache, "mn"), "train.kimg=4", "train.ckpt_every_kimg=0.32"]
    ckpts = tmp_path / "mn" / "checkpoints"
    log = tmp_path / "launch.log"

    def start() -> subprocess.Popen:
        return subprocess.Popen(args, cwd=ROOT, env={**ENV, "GAN_TEST_MARKER": marker},
                                stdout=log.open("w"), stderr=subprocess.STDOUT)

    proc = start()
    try:
        _wait_for(lambda: list(ckpts.glob("kimg-*.ckpt")) or proc.poll() is not None, 240, "the first checkpoint")
        assert proc.poll() is None, log.read_text()[-3000:]
        (victim,) = _pids_with("RANK", "1", marker)
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: "Resuming from" in log.read_text() or proc.poll() is not None, 240, "the restart")
        # last.ckpt, or the periodic file if the kill came between the two saves (resume=auto's fallback)
        resumed_from = re.search(r"Resuming from (\S+\.ckpt)", log.read_text()).group(1)
        resumed_at = verify_checkpoint(Path(resumed_from))["counters"]["images_seen"]
        _wait_for(lambda: max(verify_checkpoint(c)["counters"]["images_seen"] for c in ckpts.glob("kimg-*.ckpt"))
                  > resumed_at or proc.poll() is not None, 240, "training after the restart")
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert "[node1]" in out and "SIGTERM: wrote" in out, out[-3000:]
    stopped = verify_checkpoint(ckpts / "last.ckpt")["counters"]["images_seen"]
    assert resumed_at < stopped < 4000
    proc = start()
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    end = verify_checkpoint(ckpts / "last.ckpt")["counters"]
    # One world of 2 ranks: 4000 images at 16 per rank is 125 D steps (a world of 1 per node would need 250).
    assert end["images_seen"] == 4000 and end["d_step"] == 125


def test_a_hung_peer_fails_the_run_after_the_timeout(tmp_path, shard_cache):
    # Two ranks started as torchrun would (its environment variables), without an agent that would restart
    # them. Rank 1 is frozen (SIGSTOP): rank 0's next collective must fail after strategy.timeout_s.
    port = 29500 + os.getpid() % 1000 + 7
    procs = []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "hang"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.train", *_common(tmp_path, shard_cache, "hang"),
                                       "train.kimg=100", "train.ckpt_every_kimg=0.32", "strategy.timeout_s=5"],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for(lambda: list((tmp_path / "hang" / "checkpoints").glob("kimg-*.ckpt")) or procs[0].poll() is not None,
                  240, "training to start")
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        procs[1].send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - frozen_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 4, err[-3000:]
    assert "another process died or hung" in err and "strategy.timeout_s=5" in err, err[-3000:]
    assert 5 <= waited < 60, waited


def _torchrun_worker(tmp_path: Path, tag: str, sigterm_rank: int, sigterm_step: int, overrides: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(29500 + os.getpid() % 1000 + 11), "tests/distributed/resume_worker.py",
           str(tmp_path), tag, str(sigterm_rank), str(sigterm_step), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    return proc, [torch.load(tmp_path / f"{tag}-rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_sigterm_on_one_rank_and_a_resumed_stream_on_two_ranks_and_workers(tmp_path, shard_cache):
    # 2 ranks x 2 loader workers, 16 images per rank: 4 batches per checkpoint "epoch", 10 in all.
    common = _common(tmp_path, shard_cache, "x") + ["data.num_workers=2", "train.kimg=0.32",
                                                      "train.ckpt_every_kimg=0.128"]
    straight, s = _torchrun_worker(tmp_path, "straight", -1, 0, [*common, "run.name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    # SIGTERM reaches rank 1 alone after D step 5; both ranks stop after step 6 (inside epoch 1) with one checkpoint.
    stopped, p = _torchrun_worker(tmp_path, "stopped", 1, 5, [*common, "run.name=split"])
    assert stopped.returncode != 0 and "exiting with 143" in stopped.stderr, stopped.stderr[-3000:]
    assert len(p[0]["batches"]) == len(p[1]["batches"]) == 6
    assert verify_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["counters"]["d_step"] == 6
    shutil.copytree(tmp_path / "split", tmp_path / "split2")
    resumed = [_torchrun_worker(tmp_path, f"resumed{i}", -1, 0, [*common, f"run.name={name}", "resume=auto"])
               for i, name in enumerate(("split", "split2"))]
    for proc, ranks in resumed:
        assert proc.returncode == 0, proc.stderr[-3000:]
        for r in (0, 1):
            # Resuming twice gives the same batches, and they are the uninterrupted run's.
            assert ranks[r]["batches"] == s[r]["batches"][6:], f"rank {r}"
            worst = max((ranks[r]["weights"][k].float() - s[r]["weights"][k].float()).abs().max().item()
                        for k in s[r]["weights"])
            assert worst <= 1e-6, (r, worst)
    assert s[0]["batches"] != s[1]["batches"]
