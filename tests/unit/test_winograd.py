"""Winograd F(4x4, 3x3) equals the direct conv, forward, backward and double backward (R1)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.layers import winograd
from pipeline.layers.winograd import conv3x3, use_winograd, winograd_conv3x3

# float32 rounding: direct conv sums 9*C products with error ~sqrt(9C) ulp of the terms; Winograd's
# transforms add entries up to 8 and 1/24, which costs about 2 more decimal digits. 1e-4 of the output's
# scale is well above both and far below any real bug (a wrong tile or sign is an O(1) error).
RTOL = 1e-4


def _close(a, b):
    scale = b.abs().max()
    assert (a - b).abs().max() <= RTOL * scale, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (3, 5, 12, 16), (1, 4, 9, 7), (2, 3, 1, 5)])
def test_forward_equals_direct_conv(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = torch.randn(6, shape[1], 3, 3)
    _close(winograd_conv3x3(x, w), F.conv2d(x, w, padding=1))


def test_float64_is_exact_to_double_rounding():
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(5, 4, 3, 3, dtype=torch.float64)
    assert torch.allclose(winograd_conv3x3(x, w), F.conv2d(x, w, padding=1), rtol=0, atol=1e-11)


def test_gradients_equal_direct_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 10, 8, requires_grad=True)
    w = torch.randn(7, 6, 3, 3, requires_grad=True)
    g = torch.randn(2, 7, 10, 8)
    gx, gw = torch.autograd.grad(winograd_conv3x3(x, w), (x, w), g)
    rx, rw = torch.autograd.grad(F.conv2d(x, w, padding=1), (x, w), g)
    _close(gx, rx)
    _close(gw, rw)


def test_double_backward_for_r1_equals_direct_conv():
    """R1 differentiates ||d D / d x||^2 with respect to the weights: needs the backward to be differentiable."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def r1_grad(conv):
        out = F.leaky_relu(conv(x, w), 0.2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), w)[0]

    _close(r1_grad(winograd_conv3x3), r1_grad(lambda a, b: F.conv2d(a, b, padding=1)))


def _grad(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, requires_grad=True)


def test_dispatch_on_avx512_takes_winograd_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    wide, narrow = _grad(256, 256, 3, 3), _grad(64, 64, 3, 3)
    assert use_winograd(_grad(1, 256, 16, 16), wide)
    assert not use_winograd(_grad(1, 64, 16, 16), narrow)  # transforms cost more than they save
    assert not use_winograd(_grad(1, 128, 16, 16), _grad(128, 128, 3, 3))
    assert not use_winograd(_grad(1, 256, 4, 4), wide)  # one overhanging tile per map
    assert not use_winograd(_grad(1, 256, 32, 32), wide)  # 256 channels lose at 32x32 (tiles leave cache)
    widest = _grad(512, 512, 3, 3)
    assert use_winograd(_grad(1, 512, 32, 32), widest) and use_winograd(_grad(1, 512, 8, 8), widest)
    assert not use_winograd(_grad(1, 256, 16, 16, dtype=torch.bfloat16), wide.bfloat16())  # precision
    assert not use_winograd(_grad(1, 256, 16, 16), _grad(256, 1, 3, 3), groups=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 tensors, but autocast asks for bf16: F.conv2d
        assert not use_winograd(_grad(1, 256, 16, 16), wide)
    monkeypatch.setenv("GAN_PIPELINE_CONV", "direct")
    assert not use_winograd(_grad(1, 256, 16, 16), wide)
    monkeypatch.setenv("GAN_PIPELINE_CONV", "fast")
    with pytest.raises(ValueError, match="GAN_PIPELINE_CONV='fast'.*auto, direct, winograd-torch"):
        use_winograd(_grad(1, 256, 16, 16), wide)


def test_dispatch_on_avx2_takes_winograd_from_64_channels(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    w128 = torch.zeros(128, 128, 3, 3)
    # With a backward (a gradient flows to the input or the weight) and forward only: 64 channels and more
    # pay from 8x8 up (with the native transforms), 32 channels and 4x4 maps do not.
    assert use_winograd(_grad(1, 128, 32, 32), w128) and use_winograd(torch.zeros(1, 128, 8, 8), w128.requires_grad_())
    assert use_winograd(_grad(1, 64, 32, 32), _grad(64, 64, 3, 3))
    assert not use_winograd(_grad(1, 32, 32, 32), _grad(32, 32, 3, 3))
    assert not use_winograd(_grad(1, 128, 4, 4), w128)
    with torch.no_grad():
        assert use_winograd(_grad(1, 128, 32, 32), w128) and not use_winograd(_grad(1, 512, 4, 4), w128)
    # A rule table may differ between training and inference: the mode follows grad mode and requires_grad.
    monkeypatch.setitem(winograd.RULES, "AVX2", {"train": winograd.WinogradRule(128, 8),
                                                 "inference": winograd.WinogradRule(1024, 8)})
    assert use_winograd(_grad(1, 128, 16, 16), w128)
    assert not use_winograd(torch.zeros(1, 128, 16, 16), torch.zeros(128, 128, 3, 3))  # nothing requires grad
    with torch.no_grad():
        assert not use_winograd(_grad(1, 128, 16, 16), w128)
    # An ISA without a measured table falls back to the most conservative one.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert winograd.cpu_isa() == "AVX512" and not use_winograd(_grad(1, 128, 16, 16), w128)


def test_conv3x3_wide_layer_matches_direct(monkeypatch):
    everywhere = winograd.WinogradRule(8, 8)
    monkeypatch.setitem(winograd.RULES, winograd.cpu_isa(), {"train": everywhere, "inference": everywhere})
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 8, 8), torch.randn(8, 8, 3, 3)
    assert use_winograd(x, w)
    _close(conv3x3(x, w), F.conv2d(x, w, padding=1))


def test_bad_weight_shape_names_the_shapes():
    with pytest.raises(ValueError, match=r"weight must be \(K, 4, 3, 3\)"):
        winograd_conv3x3(torch.zeros(1, 4, 8, 8), torch.zeros(4, 3, 3, 3))


def test_hand_written_backward_passes_gradcheck_and_gradgradcheck():
    """Finite differences in float64 check the written-out backward and its own derivative (R1's path)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv3x3, (x, w))
    assert torch.autograd.gradgradcheck(winograd_conv3x3, (x, w))


def test_channels_last_input_gives_channels_last_output_with_the_same_values():
    """StyleGAN2 runs NHWC on CPU (channels_last): the Winograd path must keep that layout, not flip it back."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    y = winograd_conv3x3(x, w)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    ref = F.conv2d(x.detach().contiguous(), w.detach(), padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(F.conv2d(x, w, padding=1).square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-3)


def test_frozen_weight_keeps_no_tiles_and_input_gradient_still_matches():
    # The G step backpropagates through a frozen D: only dx is wanted, so the input tiles (2.25x the input)
    # are not kept; with a trainable weight they are.
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    w = torch.randn(5, 6, 3, 3)
    y = winograd_conv3x3(x, w)
    assert sum(t is not None for t in y.grad_fn.saved_tensors) == 2  # x and the weight, no tiles
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    (dx_ref,) = torch.autograd.grad(F.conv2d(x, w, padding=1).square().sum(), x)
    _close(dx, dx_ref)
    assert sum(t is not None for t in winograd_conv3x3(x, w.requires_grad_()).grad_fn.saved_tensors) == 3
