"""Spectral norm, init, self-attention and conditional batch norm: numeric properties."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.layers.attention import SelfAttention
from pipeline.layers.conditional_norm import ConditionalBatchNorm2d
from pipeline.layers.spectral import SNLayers, init_weights, sn


def _top_singular_value(weight: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1).double(), ord=2).item()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sn_normalises_top_singular_value(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(48, 24), torch.randn(2, 48)
    else:
        layer, x = nn.Conv2d(6, 12, 3, padding=1), torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        layer.weight.normal_()  # sigma of a 24x48 / 12x54 Gaussian matrix is about 11
    layer = sn(layer, n_power_iterations=1, eps=1e-12)
    assert _top_singular_value(layer.parametrizations.weight.original) > 5.0
    layer.train()
    for _ in range(100):  # each training forward runs one power iteration
        layer(x)
    layer.eval()
    # torch's SN normalises the (out, -1) reshape of the kernel, which is what we measure.
    assert _top_singular_value(layer.weight) == pytest.approx(1.0, abs=1e-3)


def test_sn_off_returns_module_unchanged():
    layer = nn.Linear(3, 3)
    assert sn(layer, n_power_iterations=0, eps=1e-6) is layer
    assert not parametrize.is_parametrized(layer)
    with pytest.raises(ValueError):
        sn(layer, n_power_iterations=-1, eps=1e-6)


def test_init_ortho_gives_orthonormal_rows():
    layer = init_weights(nn.Conv2d(8, 16, 3), "ortho")
    w = layer.weight.reshape(16, -1)  # (16, 72): wide, so rows are orthonormal
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)


def test_init_n02_std():
    torch.manual_seed(0)
    layer = init_weights(nn.Linear(256, 256), "N02")
    # 65536 samples: the sample std has a standard error of about 0.02 / sqrt(2 * 65536) = 6e-5.
    assert layer.weight.std().item() == pytest.approx(0.02, abs=5e-4)
    assert layer.weight.mean().item() == pytest.approx(0.0, abs=5e-4)


def test_init_unknown_scheme():
    with pytest.raises(ValueError, match="init"):
        init_weights(nn.Linear(2, 2), "kaiming")
    with pytest.raises(ValueError, match="init"):
        SNLayers(init="kaiming")


def test_sn_layers_factory_applies_sn_and_init():
    layers = SNLayers(n_power_iterations=1, eps=1e-6, init="ortho")
    conv = layers.conv(4, 8, 3)
    assert parametrize.is_parametrized(conv, "weight") and conv.padding == (1, 1)
    w = conv.parametrizations.weight.original.reshape(8, -1)
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)
    assert not parametrize.is_parametrized(SNLayers(n_power_iterations=0).linear(3, 3))


def test_attention_starts_as_identity():
    torch.manual_seed(0)
    attn = SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(0.7)
    out = attn(x)
    assert out.shape == x.shape
    assert (out - x).abs().max().item() > 1e-3


def test_attention_loads_checkpoints_with_a_scalar_gamma():
    # gamma is (1,) since DeepSpeed came in (its broadcast cannot view a 0-dim bf16 tensor as bytes).
    attn = SelfAttention(16)
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    state["gamma"] = torch.tensor(0.25)
    attn.load_state_dict(state)
    assert attn.gamma.shape == (1,) and attn.gamma.item() == 0.25


def test_attention_is_global():
    # Changing one pixel changes the output everywhere (each position attends to all pooled ones).
    torch.manual_seed(0)
    attn = SelfAttention(16).eval()
    with torch.no_grad():
        attn.gamma.fill_(1.0)
    x = torch.randn(1, 16, 8, 8)
    x2 = x.clone()
    x2[..., 0, 0] += 5.0
    diff = (attn(x2) - attn(x)).abs().sum(dim=1)[0]  # (8, 8)
    assert diff[7, 7].item() > 1e-6


def test_attention_needs_eight_channels():
    with pytest.raises(ValueError, match="channels"):
        SelfAttention(4)


def test_cbn_train_normalises_per_channel():
    torch.manual_seed(0)
    bn = ConditionalBatchNorm2d(3, 5, eps=1e-5, momentum=0.1).train()
    scale, shift = torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, -2.0, 0.0])
    x = torch.randn(8, 3, 4, 4) * scale[:, None, None] + shift[:, None, None]
    # Bias-free projections of a zero condition: gain = 1 + 0, bias = 0.
    out = bn(x, torch.zeros(8, 5), torch.zeros(8, dtype=torch.long))
    mean = out.mean(dim=(0, 2, 3))
    var = out.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(var, torch.ones(3), atol=1e-4, rtol=0)
    # Running statistics: r <- (1 - momentum) r + momentum * batch stat (unbiased variance).
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))


def test_cbn_eval_uses_running_stats_and_conditioning():
    torch.manual_seed(0)
    bn = ConditionalBatchNorm2d(3, 5, eps=1e-5, momentum=0.1).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    out = bn(x, cond, None)
    normalized = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    gain = 1.0 + bn.to_gain(cond)[:, :, None, None]
    bias = bn.to_bias(cond)[:, :, None, None]
    torch.testing.assert_close(out, normalized * gain + bias)
    assert not torch.allclose(bn(x, -cond, None), out)  # the condition changes the output
    # Eval mode leaves running statistics untouched.
    torch.testing.assert_close(bn.running_mean, torch.tensor([1.0, 2.0, 3.0]))


def test_cbn_without_condition_is_affine_batch_norm():
    torch.manual_seed(0)
    bn = ConditionalBatchNorm2d(3, 0).train()
    ref = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        bn.gain.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        ref.weight.copy_(bn.gain)
        ref.bias.copy_(bn.bias)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x, None, None), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
