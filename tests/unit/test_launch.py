"""The torchrun command line of a node (`launch/torchrun.py`) and gan-launch's argument checks."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from launch.cli import main as gan_launch
from launch.torchrun import check_overrides, torchrun_command
from pipeline.distributed.peers import lost_peer


def test_node_command_passes_overrides_verbatim_and_adds_resume_auto():
    overrides = ["run.name=big run", "logger.tags=[a,'b c']", "+extra=x"]
    cmd = torchrun_command(nnodes=2, node_rank=1, nproc_per_node=8, master_addr="10.0.0.1", master_port=29500,
                           max_restarts=3, overrides=overrides, python="python")
    assert cmd[:cmd.index("-m", 3)] == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1",
                                         "--nproc-per-node", "8", "--master-addr", "10.0.0.1", "--master-port",
                                         "29500", "--max-restarts", "3"]
    assert cmd[-6:] == ["trainer.num_nodes=2", "trainer.devices=8", "resume=auto", *overrides]
    kept = torchrun_command(nnodes=1, node_rank=0, nproc_per_node=1, master_addr="127.0.0.1", master_port=1,
                            max_restarts=0, overrides=["run.name=x", "resume=/ckpt/last.ckpt"])
    assert "resume=auto" not in kept and kept[-1] == "resume=/ckpt/last.ckpt"
    with pytest.raises(ValueError, match="node rank 2 is outside 0..1"):
        torchrun_command(nnodes=2, node_rank=2, nproc_per_node=1, master_addr="a", master_port=1, max_restarts=0,
                         overrides=["run.name=x"])


@pytest.mark.parametrize("overrides, message", [
    (["train.kimg=1"], "give run.name=<name>"),
    (["run.name=x", "trainer.num_nodes=3"], "leave out trainer.num_nodes"),
    (["run.name=x", "++trainer.devices=2"], "leave out trainer.devices"),
])
def test_overrides_a_multi_process_run_cannot_take(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_overrides(overrides)


def test_gan_launch_bad_arguments_exit_2_naming_the_fix(capsys):
    for argv, message in ((["local", "--nodes", "0", "run.name=x"], "--nodes=0"),
                          (["local", "train.kimg=1"], "give run.name")):
        with pytest.raises(SystemExit) as exited:
            gan_launch(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_lost_peer_is_told_apart_from_other_errors():
    # The texts gloo raises (torch 2.13) for a hung peer, a dead one, and a peer that is not there at start.
    assert lost_peer(RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                                  "waiting 5000ms for recv operation to complete"))
    assert lost_peer(RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                                  "[127.0.0.1]:46752: Connection reset by peer"))
    assert lost_peer(RuntimeError("Gloo connectFullMesh failed with [...pair.cc:152] timed out connecting"))
    assert lost_peer(dist.DistBackendError("NCCL watchdog timeout"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("gloo/transport"))
