"""The native (C) Winograd tile transforms equal the PyTorch ones, for every memory layout, and fall back cleanly."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.layers import winograd, winograd_native
from pipeline.layers.winograd import winograd_conv3x3

pytestmark = pytest.mark.skipif(not winograd_native.available(), reason="no C compiler to build the native transforms")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _torch_transforms(monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("GAN_PIPELINE_CONV", "winograd-torch")
    out = fn(*args, **kwargs)
    monkeypatch.delenv("GAN_PIPELINE_CONV")
    return out


# Channel counts below, at and above the C code's block of 32; map sizes that leave overhanging tiles.
@pytest.mark.parametrize("c,h,w", [(5, 9, 7), (32, 8, 8), (70, 12, 5), (3, 1, 4)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "expanded"])
def test_native_transforms_equal_the_pytorch_ones(monkeypatch, c, h, w, layout):
    torch.manual_seed(0)
    x = torch.randn(3, c, h, w)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":  # stride 0 along the batch, as autograd hands out the gradient of a sum
        x = x[:1].expand(3, c, h, w)
    v = winograd._input_transform(x)
    u = winograd._output_transform_adjoint(x)
    m = torch.randn(36, v.shape[1], 6)
    y = winograd._output_transform(m, 3, h, w, channels_last=layout == "nhwc")
    # Same sums in another order: float32 rounding of terms up to 8x the inputs, ~1e-6 relative.
    assert _rel(v, _torch_transforms(monkeypatch, winograd._input_transform, x)) < 1e-5
    assert _rel(u, _torch_transforms(monkeypatch, winograd._output_transform_adjoint, x)) < 1e-5
    ref = _torch_transforms(monkeypatch, winograd._output_transform, m, 3, h, w, channels_last=layout == "nhwc")
    assert _rel(y, ref) < 1e-5
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def test_native_path_is_taken_outside_autograd_and_not_under_create_graph(monkeypatch):
    calls = []
    real = winograd_native.input_transform
    monkeypatch.setattr(winograd_native, "input_transform", lambda x: calls.append(torch.is_grad_enabled()) or real(x))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    y = winograd_conv3x3(x, w)  # forward: autograd.Function.forward runs without grad mode
    assert calls == [False]  # one native call, outside grad mode
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    # create_graph: the weight gradient's tiles must be differentiable, so they come from the PyTorch ops;
    # the input gradient is a Winograd conv again (its forward native, outside grad mode again).
    assert gx.requires_grad and calls == [False, False]
    calls.clear()
    torch.autograd.grad(winograd_conv3x3(x, w).square().sum(), (x, w))  # plain backward: all native
    assert calls == [False, False]


def test_without_a_compiler_it_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(winograd_native, "_lib", None)
    monkeypatch.setattr(winograd_native, "_failed", None)
    monkeypatch.setenv("GAN_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="falls back to its PyTorch transforms.*no-such-cc"):
        assert not winograd_native.available()
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 8, 8), torch.randn(8, 8, 3, 3)
    y = winograd_conv3x3(x, w)
    assert _rel(y, F.conv2d(x, w, padding=1)) < 1e-4


def test_builds_into_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(winograd_native, "_lib", None)
    monkeypatch.setattr(winograd_native, "_failed", None)
    monkeypatch.setenv("GAN_PIPELINE_CACHE", str(tmp_path))
    assert winograd_native.available()
    built = list((tmp_path / "kernels").glob("winograd_*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.tmp"))
