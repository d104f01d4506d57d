"""EMA arithmetic, sampling helpers and single-process sync."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.distributed.sync import all_reduce_grads, sync_buffers
from pipeline.training.ema import EMASchedule, update_ema
from pipeline.training.sampling import make_grid, sample_labels, truncated_normal


def test_ema_update_is_the_convex_blend_and_copies_buffers():
    G, G_ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        G.weight.fill_(2.0)
        G_ema.weight.fill_(1.0)
        G.running_mean.fill_(5.0)
    update_ema(G_ema, G, decay=0.9)
    assert torch.allclose(G_ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(G_ema.running_mean, G.running_mean)


def test_ema_schedule_copies_before_start_then_averages():
    s = EMASchedule(decay=0.999, start_step=10)
    assert s.decay_at(0) == 0.0 and s.decay_at(9) == 0.0 and s.decay_at(10) == 0.999
    # n updates at decay d leave weight d^n on the starting value: the EMA's half-life is ln 2 / -ln d steps.
    p0, p1 = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        p0.weight.fill_(1.0)
        p1.weight.fill_(0.0)
    half_life = math.log(2) / -math.log(0.999)
    for _ in range(round(half_life)):
        update_ema(p0, p1, 0.999)
    assert p0.weight.item() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="decay"):
        EMASchedule(decay=1.0)


def test_truncated_normal_respects_threshold_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    z = truncated_normal((4000, 8), 0.5, generator=g)
    assert z.abs().max() <= 0.5
    # A N(0,1) truncated to [-a, a] has variance 1 - 2a phi(a) / (2 Phi(a) - 1).
    a = 0.5
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    var = 1 - 2 * a * phi / (2 * Phi - 1)
    assert z.var().item() == pytest.approx(var, rel=0.05)  # 32k samples: sampling error ~1%
    z2 = truncated_normal((4000, 8), 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)


def test_sample_labels_follows_class_probabilities():
    probs = torch.tensor([0.7, 0.2, 0.1])
    y = sample_labels(20000, probs, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(y, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)  # binomial std <= 0.0033
    assert torch.equal(sample_labels(5, None), torch.zeros(5, dtype=torch.long))


def test_make_grid_is_uint8_and_places_images():
    x = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.0)])
    grid = make_grid(x, nrow=2, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (6, 11, 3)
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:5, 6:10] == 255).all()


def test_sync_is_a_no_op_on_one_process():
    net = nn.Linear(2, 2)
    net(torch.ones(1, 2)).sum().backward()
    before = net.weight.grad.clone()
    all_reduce_grads(net.parameters())
    sync_buffers(net)
    assert torch.equal(net.weight.grad, before)


def test_no_truncation_is_plain_normal_and_bad_threshold_raises():
    a = truncated_normal((1000,), None, generator=torch.Generator().manual_seed(1))
    b = torch.randn((1000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="truncation"):
        truncated_normal((3,), 0.0)


# --- W&B mode ------------------------------------------------------------------------------------------


def test_wandb_mode_auto_is_offline_without_an_api_key(monkeypatch, tmp_path):
    from pipeline.training.tracking import resolve_mode

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` credentials either
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert resolve_mode("auto") == "online"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # the user's environment wins over auto
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="mode='cloud' must be auto, online, offline or disabled"):
        resolve_mode("cloud")
