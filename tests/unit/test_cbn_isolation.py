"""Per-class cBN statistics: no leakage between classes, exact per-class moments, gradients, fallback, eval, standing stats."""
import pytest
import torch

from pipeline.layers.conditional_norm import ConditionalBatchNorm2d
from pipeline.models.biggan.generator import Generator
from pipeline.training.sampling import FakeLabels
from pipeline.training.standing_stats import standing_statistics

EPS = 1e-5


def _layer(**kw) -> ConditionalBatchNorm2d:
    return ConditionalBatchNorm2d(3, 0, eps=EPS, stats="per_class", num_classes=4, **kw).train()


def _moments(x):  # biased, over (N, H, W): what BatchNorm normalises with
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def _normalized(x, mean, var):
    return (x - mean[None, :, None, None]) / (var[None, :, None, None] + EPS).sqrt()


def _tiny_G(stats: str) -> Generator:
    torch.manual_seed(0)
    return Generator(resolution=16, channels=1, num_classes=4, z_dim=42, ch=4, attn_resolutions=[16],
                     cbn_stats=stats, cbn_min_count=2).train()


@pytest.mark.parametrize("stats", ["pooled", "per_class"])
def test_class_a_outputs_ignore_class_b_latents_only_with_per_class(stats):
    G = _tiny_G(stats)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    z = torch.randn(8, 42)
    z2 = z.clone()
    z2[3:] = 3 * torch.randn(5, 42)  # new latents for classes 1 and 2
    a, b = G(z, y)[:3], G(z2, y)[:3]
    change = (a - b).abs().max()
    if stats == "per_class":
        # float32 rounding of the same per-class sums, through a few layers: far below any leak (O(0.1))
        assert change < 1e-5, float(change)
    else:
        assert change > 1e-2, float(change)


def test_per_class_layer_normalizes_each_class_with_its_own_moments():
    torch.manual_seed(0)
    bn = _layer()
    y = torch.tensor([0, 0, 2, 2, 2, 3, 3])
    x = torch.randn(7, 3, 5, 5) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2.0 * y[:, None, None, None]
    out = bn(x, None, y)
    for k in (0, 2, 3):
        xk = x[y == k]
        torch.testing.assert_close(out[y == k], _normalized(xk, *_moments(xk)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["all_classes_large", "lone_sample_running", "lone_sample_pooled"])
def test_written_out_backward_passes_gradcheck(case):
    """x, gain and bias gradients of the per-class Function, with and without a class below min_count."""
    from pipeline.layers.per_class_norm import PerClassNorm

    torch.manual_seed(0)
    # momentum 0: the running statistics (the running fallback) stay constant between gradcheck's evaluations
    bn = _layer(momentum=0.0, fallback="pooled" if case.endswith("pooled") else "running").double()
    y = torch.tensor([1, 1, 0, 0, 0]) if case == "all_classes_large" else torch.tensor([1, 1, 0, 0, 3])
    x = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(5, 3, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: PerClassNorm.apply(*t, y, bn), (x, gain, bias))


@pytest.mark.parametrize("fallback", ["running", "pooled"])
def test_a_class_below_min_count_takes_the_fallback(fallback):
    torch.manual_seed(0)
    bn = _layer(min_count=2, fallback=fallback, momentum=1.0)  # momentum 1: running = last batch (unbiased)
    y = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 has a single sample
    x = torch.randn(6, 3, 4, 4) + y[:, None, None, None].float()
    out = bn(x, None, y)
    lone = out[y == 2]
    if fallback == "pooled":
        expected = _normalized(x[y == 2], *_moments(x))  # the batch's pooled moments, all classes
    else:
        # Class 2 was never seen with enough samples: the pooled running statistics, updated by this very
        # batch before use (momentum 1: its pooled mean and unbiased variance).
        n = x.numel() // 3
        mean, var = _moments(x)
        expected = _normalized(x[y == 2], mean, var * n / (n - 1))
    torch.testing.assert_close(lone, expected, rtol=1e-5, atol=1e-5)
    assert bn.class_updates.tolist() == [1, 1, 0, 0]  # only classes with min_count samples update
    if fallback == "running":  # once class 2 has running statistics, a lone class-2 sample uses them
        bn(torch.randn(4, 3, 4, 4) + 2.0, None, torch.tensor([2, 2, 2, 2]))
        x2 = torch.randn(3, 3, 4, 4)
        y2 = torch.tensor([0, 0, 2])
        out2 = bn(x2, None, y2)
        torch.testing.assert_close(out2[2:], _normalized(x2[2:], bn.class_running_mean[2], bn.class_running_var[2]),
                                   rtol=1e-5, atol=1e-5)


def test_eval_mode_uses_per_class_running_statistics():
    torch.manual_seed(0)
    bn = _layer(momentum=1.0)
    y = torch.tensor([0, 0, 1, 1, 1])
    x = torch.randn(5, 3, 4, 4) * (1 + y[:, None, None, None].float()) + 3 * y[:, None, None, None].float()
    bn(x, None, y)
    for k in (0, 1):  # running = this batch's class moments, variance unbiased over the class's values
        mean, var = _moments(x[y == k])
        n = x[y == k].numel() // 3
        torch.testing.assert_close(bn.class_running_mean[k], mean)
        torch.testing.assert_close(bn.class_running_var[k], var * n / (n - 1))
    bn.eval()
    xe = torch.randn(3, 3, 4, 4)
    ye = torch.tensor([0, 1, 3])  # class 3 never seen: pooled running statistics
    out = bn(xe, None, ye)
    torch.testing.assert_close(out[1:2], _normalized(xe[1:2], bn.class_running_mean[1], bn.class_running_var[1]))
    torch.testing.assert_close(out[2:], _normalized(xe[2:], bn.running_mean, bn.running_var))
    # eval mode: each sample alone is what it is in any batch
    torch.testing.assert_close(bn(xe[:1], None, ye[:1]), out[:1])


def test_momentum_none_gives_the_cumulative_average_per_class():
    torch.manual_seed(0)
    bn = _layer(momentum=None)
    batches = [(torch.randn(6, 3, 4, 4) + i, torch.tensor([0, 0, 0, 1, 1, 1])) for i in range(3)]
    means = []
    for x, y in batches:
        bn(x, None, y)
        means.append(_moments(x[y == 1])[0])
    torch.testing.assert_close(bn.class_running_mean[1], torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, torch.stack([_moments(x)[0] for x, _ in batches]).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_standing_statistics_reestimate_only_batchnorm_and_restore_the_module():
    G = _tiny_G("per_class")
    G(torch.randn(8, 42), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))  # some running statistics from "training"
    G.eval()
    bn = G.blocks[0].bn1
    before = bn.class_running_mean.clone()
    sn_vectors = {k: v.clone() for k, v in G.state_dict().items() if k.endswith("_u")}
    # two cBNs per block and the output BN
    assert standing_statistics(G, num_batches=5, batch_size=16, samples_per_class=4, seed=0) == 2 * len(G.blocks) + 1
    assert not G.training and bn.momentum == 0.1
    # Each batch is 4 groups of 4 labels, drawn as standing_statistics draws them: a class updates once
    # per batch it appears in.
    draws = FakeLabels(grouping="grouped", samples_per_class=4, distribution="uniform")
    expected = torch.zeros(4, dtype=torch.long)
    for i in range(5):
        expected[draws.draw(16, torch.ones(4), rank=0, world=1, seed=0, index=i).unique()] += 1
    assert torch.equal(bn.class_updates, expected) and expected.sum() >= 5
    assert not torch.allclose(bn.class_running_mean, before)
    for k, v in sn_vectors.items():  # spectral norm's power iteration did not run (its modules stayed in eval)
        assert torch.equal(G.state_dict()[k], v), k


def test_per_class_needs_labels_and_names_the_key():
    with pytest.raises(ValueError, match="model.generator.cbn_stats=per_class needs class labels"):
        Generator(resolution=16, channels=1, num_classes=0, z_dim=42, ch=4, attn_resolutions=[], cbn_stats="per_class")
    with pytest.raises(ValueError, match="model.generator.cbn_stats='batch' is not one of pooled, per_class"):
        _tiny_G("batch")
    with pytest.raises(ValueError, match="cbn_fallback='zero'"):
        ConditionalBatchNorm2d(3, 0, stats="per_class", num_classes=2, fallback="zero")
