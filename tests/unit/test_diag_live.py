"""Live-model checks: demodulation keeps unit variance; the activation report; cBN leakage pooled vs per-class."""
import math

import pytest
import torch

from pipeline.diagnostics.live import activation_variance, cbn_leakage
from pipeline.layers.modulated_conv import modulated_conv2d
from pipeline.models.biggan.generator import Generator as BigGAN
from pipeline.models.stylegan2.generator import Generator as StyleGAN2


def _kernel_autocorrelation_sq_sum(w: torch.Tensor) -> float:
    """sum_d rho(d)^2 for out = conv(x, w) of one output channel, x i.i.d. unit variance: rho(d) is the kernel's
    autocorrelation summed over input channels, w (I, k, k) normalized to sum w^2 = 1."""
    k = w.shape[-1]
    rho = torch.nn.functional.conv2d(w[None], w[None], padding=k - 1)  # (1, 1, 2k-1, 2k-1), rho(0) = 1
    return float(rho.square().sum())


@pytest.mark.parametrize("demodulate", [True, False])
def test_demodulated_conv_of_unit_variance_input_has_unit_variance(demodulate):
    torch.manual_seed(0)
    n, c_in, c_out, size = 2, 8, 4, 130
    x = torch.randn(n, c_in, size, size, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64) / math.sqrt(c_in * 9)
    styles = 1.5 + torch.rand(n, c_in, dtype=torch.float64)  # in [1.5, 2.5): != 1
    out = modulated_conv2d(x, weight, styles, demodulate=demodulate)[:, :, 1:-1, 1:-1]  # interior: no padding
    m = out[0, 0].numel()
    for i in range(n):
        w = weight * styles[i][None, :, None, None]  # eq. 1
        if demodulate:
            w = w / w.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()  # eq. 3: unit norm per output channel
        for j in range(c_out):
            expected = float(w[j].square().sum())  # var(out_j) = sum w''^2 var(x) = 1 with demodulation
            # mean(out^2) of a Gaussian MA field: variance 2 var^2 sum_d rho(d)^2 / M; 5 standard errors
            tol = 5 * expected * math.sqrt(2 * _kernel_autocorrelation_sq_sum(w[j] / math.sqrt(expected)) / m)
            measured = float(out[i, j].square().mean())
            assert abs(measured - expected) < tol, (i, j, measured, expected, tol)
            if demodulate:
                assert abs(expected - 1) < 1e-6
            else:  # styles in [1.5, 2.5) scale the variance by ~ mean s^2 ~ 4: far outside the tolerance of 1
                assert abs(measured - 1) > 5 * tol


def test_activation_report_on_a_tiny_stylegan2():
    torch.manual_seed(0)
    G = StyleGAN2(resolution=16, channels=1, num_classes=3, z_dim=16, w_dim=16, mapping_layers=2,
                  channel_base=256, channel_max=16).train()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    report = activation_variance(G, num_samples=16, generator=torch.Generator().manual_seed(0))
    # one entry per 3x3 conv: 4x4 has one, 8x8 and 16x16 two each (num_ws - 1 = all but the last toRGB)
    assert len(report["layers"]) == G.num_ws - 1 == 5
    for entry in report["layers"].values():
        assert all(math.isfinite(entry[k]) and entry[k] > 0 for k in ("var_in", "var_out", "ratio"))
    assert math.isfinite(report["max_abs_log_var_out"]) and math.isfinite(report["max_abs_log_ratio"])
    assert G.training  # mode and state put back
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("stats", ["pooled", "per_class"])
def test_cbn_leakage_is_zero_only_with_per_class_statistics(stats):
    torch.manual_seed(0)
    G = BigGAN(resolution=16, channels=1, num_classes=4, z_dim=42, ch=4, attn_resolutions=[16],
               cbn_stats=stats, cbn_min_count=2)
    report = cbn_leakage(G, samples_per_class=3, generator=torch.Generator().manual_seed(0))
    assert report["cbn_stats"] == stats
    if stats == "per_class":
        # the same per-class sums in float32 through a few layers (as test_cbn_isolation): rounding only
        assert report["max_abs_change"] < 1e-5
    else:
        assert report["mean_relative_change"] > 1e-2
