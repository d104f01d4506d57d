"""Training diagnostics: SN singular values, gradient norms, memory."""
import pytest
import torch
from torch import nn

from pipeline.layers.spectral import sn
from pipeline.training.network_stats import NetworkStats, grad_norm, memory_mb, spectral_sigmas


def test_sigma_is_the_top_singular_value_of_the_raw_weight():
    torch.manual_seed(0)
    net = nn.Sequential(sn(nn.Linear(12, 8), n_power_iterations=1, eps=1e-6),
                        nn.ReLU(), sn(nn.Conv2d(3, 5, 3), n_power_iterations=1, eps=1e-6), nn.Linear(4, 4))
    lin, conv = net[0], net[2]
    for _ in range(200):  # training-mode forwards advance the power iteration
        lin(torch.randn(2, 12))
        conv(torch.randn(2, 3, 5, 5))
    sigmas = spectral_sigmas(net)
    assert set(sigmas) == {"0", "2"}  # the plain Linear has no SN
    for key, m in (("0", lin), ("2", conv)):
        w = m.parametrizations.weight.original.detach().flatten(1)
        true = torch.linalg.matrix_norm(w, ord=2)
        # Power iteration converges geometrically, as (s2/s1)^(2k); after 200 steps on random Gaussian
        # matrices of this size the estimate is within float rounding of the true value.
        assert sigmas[key] == pytest.approx(float(true), rel=1e-4)
        # ... and the normalised weight the layer uses has sigma ~ 1 by construction.
        assert float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)) == pytest.approx(1.0, rel=1e-4)


def test_grad_norm_is_the_global_l2_norm():
    net = nn.Linear(3, 2)
    assert grad_norm(net) == 0.0  # no backward yet
    net(torch.ones(1, 3)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert grad_norm(net) == pytest.approx(float(expected))


def test_memory_reports_peak_rss_in_mb():
    before = memory_mb(torch.device("cpu"))["memory/peak_rss_mb"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MB touched
    after = memory_mb(torch.device("cpu"))["memory/peak_rss_mb"]
    assert 10 < before and after >= before
    del block


def test_collect_covers_both_networks():
    class Module:
        G = nn.Sequential(sn(nn.Linear(4, 4), n_power_iterations=1, eps=1e-6))
        D = nn.Linear(4, 1)
        device = torch.device("cpu")

    stats = NetworkStats(every_kimg=1.0).collect(Module())
    assert {"grad_norm/G", "grad_norm/D", "sn_sigma/G_max", "sn_sigma/G/0", "memory/peak_rss_mb"} <= set(stats)
    assert not any(k.startswith("sn_sigma/D") for k in stats)  # D has no SN layer
    with pytest.raises(ValueError, match="every_kimg"):
        NetworkStats(every_kimg=0)
