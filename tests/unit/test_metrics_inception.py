"""The hand-written FID InceptionV3: state-dict layout, loading with checksum, input handling, clear errors.

The real weights cannot be downloaded here, so a randomly initialised network is saved to a temp file.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from pipeline.metrics.errors import EvalError
from pipeline.metrics.features import FeatureNet, load_feature_net, resolve_feature_net, to_8bit_grid
from pipeline.metrics.inception import WEIGHTS_NAME, WEIGHTS_URL, InceptionV3FID, load_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionV3FID()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that loading them is visible
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), net.state_dict()


def test_layout_matches_the_torchvision_inception3_used_by_pytorch_fid():
    state = InceptionV3FID().state_dict()
    # torchvision's Inception3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with the FID
    # graph's 1008-way fc (+16,392) that is 23,850,960.
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked"))) == 23_850_960
    for key, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                       "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                       "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                       "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                       "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)}.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


def test_loads_strictly_with_a_matching_checksum(weights):
    path, digest, saved = weights
    net, got = load_inception(path, expected_sha256=digest)
    assert got == digest and not net.training
    assert torch.equal(net.state_dict()["Mixed_6c.branch7x7_2.bn.running_var"],
                       saved["Mixed_6c.branch7x7_2.bn.running_var"])
    load_inception(path, expected_sha256=digest[:8])  # a prefix, as in the published file name


def test_loads_files_without_batchnorm_counters(weights, tmp_path):
    _, _, saved = weights
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}, path)
    load_inception(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def test_checksum_mismatch_says_how_to_obtain_the_file(weights):
    path, _, _ = weights
    with pytest.raises(EvalError, match="checksum") as err:
        load_inception(path)  # the default expects the published file's sha256 prefix 6726825d
    assert WEIGHTS_URL in str(err.value)


def test_missing_weights_say_how_to_obtain_them(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match="do not exist") as err:
        load_inception(tmp_path / WEIGHTS_NAME)
    assert WEIGHTS_URL in str(err.value) and "GAN_PIPELINE_INCEPTION" in str(err.value)
    monkeypatch.delenv("GAN_PIPELINE_INCEPTION", raising=False)
    manifest = {"source": "/data/cifar-shards", "resolution": 32}
    with pytest.raises(EvalError, match="GAN_PIPELINE_INCEPTION") as err:
        resolve_feature_net(None, manifest=manifest, shard_dir=tmp_path, cache_dir=tmp_path)
    assert WEIGHTS_URL in str(err.value)


def test_output_shape_resize_gray_and_range(weights, monkeypatch):
    path, digest, _ = weights
    monkeypatch.setenv("GAN_PIPELINE_INCEPTION", str(path))
    monkeypatch.setenv("GAN_PIPELINE_INCEPTION_SHA256", digest)
    fnet = resolve_feature_net("inception", manifest={"source": "digits", "resolution": 32}, shard_dir=path.parent,
                               cache_dir=path.parent)
    assert isinstance(fnet, FeatureNet) and fnet.kind == "inception" and fnet.id == digest
    assert load_feature_net(path, inception_sha256=digest).id == digest  # told apart from a domain net by content
    gen = torch.Generator().manual_seed(0)
    x = to_8bit_grid(torch.rand(1, 1, 32, 32, generator=gen) * 2 - 1)  # gray 32x32 in [-1, 1], on 8-bit levels
    feats, logits = fnet(x * 1.5)  # out-of-range values are clamped to [-1, 1] first
    assert feats.shape == (1, 2048) and logits is None and torch.isfinite(feats).all()
    # The same as pytorch-fid's path: RGB input, bilinear resize to 299 (align_corners=False), then the network.
    x_rgb = F.interpolate(x.clamp(-1, 1).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                          align_corners=False)
    with torch.no_grad():
        direct = fnet.net(x_rgb)
    torch.testing.assert_close(feats, direct, rtol=1e-4, atol=1e-5)


def test_to_8bit_grid_is_idempotent_on_real_images_and_clamps():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # what a uint8 PNG becomes
    torch.testing.assert_close(to_8bit_grid(levels), levels, rtol=0, atol=1e-6)
    assert to_8bit_grid(torch.tensor([-3.0, 2.0])).tolist() == [-1.0, 1.0]
