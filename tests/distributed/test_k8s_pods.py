"""Pod emulation: the rendered Indexed Job's two pods, run here as local processes, form one world and train.

Each pod's process is the container's argv as the kubelet hands it over (`$(VAR)` expanded, `$$` -> `$`) with
the environment its manifest gives it plus the JOB_COMPLETION_INDEX Kubernetes adds. What is mapped to this
machine: pod 0's DNS name -> 127.0.0.1, the image's /app -> this checkout, the PVC's mount path -> a temporary
folder; nothing else is changed.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from launch.k8s import render_job
from launch.k8s.command import ENTRYPOINT, expand_like_kubelet
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_indexed_jobs_pods_form_one_world_and_train(tmp_path):
    mount = tmp_path / "pvc"
    overrides = [*TINY, "train.kimg=0.128", "train.ckpt_every_kimg=0.064", "~logger", "data.num_workers=0",
                 "trainer.accelerator=cpu", "strategy.timeout_s=120"]
    manifests = render_job(target="indexed-job", nodes=2, gpus_per_node=1, image=None, name="emu", namespace="ns",
                           overrides=overrides, launch_overrides=[f"launch.mount_path={mount}",
                                                                  f"launch.port={free_port()}",
                                                                  "launch.max_restarts=0"])
    job = next(m for m in manifests if m["kind"] == "Job")
    service = next(m for m in manifests if m["kind"] == "Service")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    master = f"{job['metadata']['name']}-0.{pod['subdomain']}.ns.svc"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2

    procs = []
    for index in range(2):
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # the Secret's key is left out
        assert env["GAN_MASTER_ADDR"] == master  # pod 0's stable name through the headless Service
        env.update(GAN_MASTER_ADDR="127.0.0.1", JOB_COMPLETION_INDEX=str(index))  # what DNS / Kubernetes provide
        argv = [expand_like_kubelet(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        argv = [str(ROOT / "k8s" / "entrypoint.sh") if a == ENTRYPOINT else a for a in argv]
        base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        procs.append(subprocess.Popen(argv, cwd=ROOT, env={**base, **env, "PYTHON": sys.executable,
                                                           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                           "WANDB_SILENT": "true"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    run_dir = mount / "runs" / "emu"  # the deterministic run directory on the volume
    summary = json.loads((run_dir / "summary.json").read_text())
    # One world of two ranks: 128 images in batches of 16 per rank are 4 D steps, not the 8 of one rank alone.
    assert summary["world_size"] == 2 and summary["images_seen"] == 128 and summary["d_steps"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
