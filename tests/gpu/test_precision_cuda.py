"""fp16 on CUDA through both strategies: an overflow in D's gradients skips D's step and lowers D's scale only.

Run on a GPU machine with `pytest -m gpu tests/gpu`; skipped without CUDA. The throughput comparison is
bench/precision_gpu.sh.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from pipeline.distributed.backend import DDPBackend, DeepSpeedBackend
from pipeline.distributed.precision import Precision
from tests.distributed.engine_case import tiny_gan, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def process_group():
    """DeepSpeed needs a process group, even for one rank (NCCL here)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    yield


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero1", "deepspeed-zero2"])
def test_fp16_overflow_in_d_leaves_g_alone_on_cuda(strategy, process_group):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        backend = DeepSpeedBackend(zero_stage=int(strategy[-1]), hysteresis=1)  # hysteresis 1: lower at once
    else:
        backend = DDPBackend()
    gan = tiny_gan(backend, Precision(mode="fp16", init_scale=2.0**10), r1_gamma=0.0, pl_weight=0.0, device="cuda")
    train(gan, range(0, 1))
    d, g = gan.engines["D"], gan.engines["G"]
    assert d.grad_scale == g.grad_scale == 2.0**10
    d_before = [p.detach().clone() for p in gan.D.parameters()]
    handle = next(gan.D.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
    train(gan, range(1, 2))
    handle.remove()
    assert d.grad_scale == 2.0**9 and d.stats()["skipped_steps"] == 1
    assert g.grad_scale == 2.0**10 and g.stats()["skipped_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(d_before, gan.D.parameters()))
    train(gan, range(2, 4))
    assert all(bool(torch.isfinite(p).all()) for p in gan.G.parameters())
