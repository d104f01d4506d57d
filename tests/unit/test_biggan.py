"""BigGAN generator and discriminator: shapes, validation, conditioning and hierarchical z."""

import pytest
import torch

from pipeline.layers.attention import SelfAttention
from pipeline.models.biggan.discriminator import Discriminator
from pipeline.models.biggan.generator import Generator

Z_DIM = 60  # divisible by num_blocks + 1 = 2, 3, 4, 5 for resolutions 8, 16, 32, 64


def _g(resolution=16, num_classes=5, **overrides) -> Generator:
    args = dict(resolution=resolution, channels=3, num_classes=num_classes, z_dim=Z_DIM, ch=8, attn_resolutions=())
    args.update(overrides)
    return Generator(**args)


def _d(resolution=16, num_classes=5, **overrides) -> Discriminator:
    args = dict(resolution=resolution, channels=3, num_classes=num_classes, ch=8, attn_resolutions=())
    args.update(overrides)
    return Discriminator(**args)


def _count_attention(model) -> int:
    return sum(isinstance(m, SelfAttention) for m in model.modules())


@pytest.mark.parametrize(
    "resolution, g_attn, d_attn", [(8, (8,), (4,)), (16, (8,), (8,)), (32, (16,), (8,)), (64, (32,), (16,))]
)
def test_shapes_and_range(resolution, g_attn, d_attn):
    torch.manual_seed(0)
    G = _g(resolution, attn_resolutions=g_attn).train()
    D = _d(resolution, attn_resolutions=d_attn).train()
    assert (G.z_dim, G.num_classes, G.resolution, G.channels) == (Z_DIM, 5, resolution, 3)
    assert _count_attention(G) == 1 and _count_attention(D) == 1
    z, y = torch.randn(3, Z_DIM), torch.tensor([0, 4, 2])
    x = G(z, y)
    assert x.shape == (3, 3, resolution, resolution)
    assert x.abs().max().item() <= 1.0 and x.std().item() > 1e-3
    logits = D(x, y)
    assert logits.shape == (3,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("resolution", [48, 20, 4])
def test_bad_resolution(resolution):
    with pytest.raises(ValueError, match="resolution.*32"):
        _g(resolution)
    with pytest.raises(ValueError, match="resolution.*32"):
        _d(resolution)


def test_bad_attn_resolutions():
    with pytest.raises(ValueError, match=r"attn_resolutions.*\[8, 16\]"):
        _g(16, attn_resolutions=(4,))
    with pytest.raises(ValueError, match="attn_resolutions"):
        _d(16, attn_resolutions=(16,))  # the input resolution is not a block output


def test_d_attention_after_first_block_at_resolution():
    # 32x32 D outputs 16, 8, 8, 8: one attention layer, after block 1.
    D = _d(32, attn_resolutions=(8,))
    assert [isinstance(a, SelfAttention) for a in D.attn] == [False, True, False, False]


def test_z_dim_must_divide_into_chunks():
    with pytest.raises(ValueError, match="z_dim"):
        _g(32, z_dim=121)
    G = _g(32, z_dim=121, hier=False)  # a flat z has no chunks
    assert G.linear.in_features == 121


@pytest.mark.parametrize("hier", [True, False])
def test_unconditional(hier):
    torch.manual_seed(0)
    G, D = _g(num_classes=0, hier=hier).eval(), _d(num_classes=0).eval()
    assert G.shared is None and D.embed is None
    z = torch.randn(2, Z_DIM)
    x = G(z)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(G(z, torch.tensor([0, 1])), x)  # labels are ignored
    assert D(x).shape == (2,)


def test_changing_one_z_chunk_changes_only_that_sample():
    torch.manual_seed(0)
    G = _g(32).eval()  # eval: running BN stats, frozen SN vectors -> samples are independent
    chunk = Z_DIM // 4
    z, y = torch.randn(2, Z_DIM), torch.tensor([1, 2])
    z2 = z.clone()
    z2[0, -chunk:] = torch.randn(chunk)  # the last chunk conditions only the last block's cBNs
    x, x2 = G(z, y), G(z2, y)
    assert (x[0] - x2[0]).abs().max().item() > 1e-3
    torch.testing.assert_close(x[1], x2[1])


@pytest.mark.parametrize("hier", [True, False])
def test_class_conditioning_changes_outputs(hier):
    torch.manual_seed(0)
    G, D = _g(hier=hier).eval(), _d().eval()
    z, y, y2 = torch.randn(4, Z_DIM), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4])
    assert (G(z, y) - G(z, y2)).abs().max().item() > 1e-3
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert (D(x, y) - D(x, y2)).abs().min().item() > 1e-6
    with pytest.raises(ValueError, match="labels"):
        G(z)
    with pytest.raises(ValueError, match="labels"):
        D(x)


def test_projection_term_is_inner_product():
    # D(x, y) - D(x, y') = <embed(y) - embed(y'), phi(x)> (Miyato & Koyama 2018, eq. 3).
    torch.manual_seed(0)
    D = _d().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y, y2 = torch.tensor([0, 1]), torch.tensor([3, 3])
    h = x
    for block, attn in zip(D.blocks, D.attn):
        h = attn(block(h))
    phi = torch.relu(h).sum(dim=(2, 3))
    expected = ((D.embed(y) - D.embed(y2)) * phi).sum(dim=1)
    torch.testing.assert_close(D(x, y) - D(x, y2), expected, rtol=1e-4, atol=1e-4)
