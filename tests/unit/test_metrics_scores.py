"""FID, KID, precision/recall, intra-FID and accuracy: numeric properties with tolerances from the math."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline.data.digits import load_digits
from pipeline.metrics import scores
from pipeline.data.shards import write_shards
from pipeline.metrics.domain_net import domain_net_from_record
from pipeline.metrics.errors import EvalError
from pipeline.metrics.features import FeatureNet, extract_features
from pipeline.metrics.fit import fit_domain_net


def _gauss(n: int, d: int, seed: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std + mean


def _fid_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    """The textbook formula (pytorch-fid's): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    a, b = a.numpy(), b.numpy()
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_fid_matches_the_textbook_formula_and_the_gaussian_closed_form():
    n, d, m, s = 3000, 16, 0.3, 1.5
    a, b = _gauss(n, d, 0), _gauss(n, d, 1, mean=m, std=s)
    assert scores.fid(a, b) == pytest.approx(_fid_scipy(a, b), rel=1e-6)
    # N(0, I) vs N(m 1, s^2 I): FID = d m^2 + d (1 - s)^2 = 5.44. The estimate's noise, to first order:
    # the mean term 2 m 1.(mu_a^ - mu_b^) has variance 4 m^2 d (1 + s^2) / n; per dimension the covariance
    # term (sqrt(v_a) - sqrt(v_b))^2 moves by (1 - s) dv_a and (1 - 1/s) dv_b, with Var(v^) = 2 v^2 / n.
    var_mean = 4 * m**2 * d * (1 + s**2) / n
    var_cov = d * ((1 - s) ** 2 * 2 / n + (1 - 1 / s) ** 2 * 2 * s**4 / n)
    assert abs(scores.fid(a, b) - d * (m**2 + (1 - s) ** 2)) < 4 * (var_mean + var_cov) ** 0.5


def test_fid_of_a_set_with_itself_is_zero():
    a = _gauss(500, 32, 2)
    assert abs(scores.fid(a, a)) < 1e-8 * float(torch.cov(a.T).trace())


@pytest.fixture(scope="module")
def digit_features(tmp_path_factory):
    """Digits at 16x16 and noisy versions of them, embedded by a domain network fitted briefly on them."""
    shards = tmp_path_factory.mktemp("digits") / "digits-16"
    write_shards("digits", shards, resolution=16, progress=False)
    record = fit_domain_net(shards, shards.parent / "net.pt", epochs=2, width=8, progress=False)
    net = FeatureNet(domain_net_from_record(record, "net.pt"), kind="domain", net_id=record["id"], info={})
    images, labels = load_digits(16)
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)  # (1797, 1, 16, 16) in [-1, 1]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out = {}
    for sigma in (0.0, 0.1, 0.2, 0.4, 0.8):
        batches = [(x[i:i + 600] + sigma * noise[i:i + 600], torch.from_numpy(labels[i:i + 600]))
                   for i in range(0, len(x), 600)]
        out[sigma] = extract_features(net, batches, progress=False)[0].double()
    return out, torch.from_numpy(labels)


def test_fid_grows_monotonically_with_noise_and_halves_are_close(digit_features):
    feats, _ = digit_features
    real = feats[0.0]
    values = [scores.fid(real, feats[s]) for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert abs(values[0]) < 1e-6 * float(torch.cov(real.T).trace())
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    # Two disjoint random halves: the finite-sample FID of two independent draws from one distribution.
    # Its size is what two Gaussian draws with the same mean, covariance and sizes give (parametric bootstrap).
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    a, b = real[perm[:898]], real[perm[898:]]
    halves = scores.fid(a, b)
    mvn = torch.distributions.MultivariateNormal(real.mean(0), torch.cov(real.T) + 1e-9 * torch.eye(real.shape[1]))
    torch.manual_seed(0)
    boot = max(scores.fid(mvn.sample((898,)), mvn.sample((899,))) for _ in range(3))
    # Real features are not Gaussian, hence a margin: measured 0.075 against 0.050 (ratio 1.5).
    assert halves < 2.5 * boot, (halves, boot)
    assert halves < 0.05 * values[-1], (halves, values)


def test_kid_is_zero_within_its_std_for_one_distribution_and_large_for_a_shift():
    a, b = _gauss(1500, 16, 3), _gauss(1500, 16, 4)
    mean, std, size = scores.kid(a, b, subsets=10, subset_size=400)
    assert size == 400
    # The unbiased MMD^2 estimate has expectation 0 under equal distributions; the mean over (overlapping)
    # subsets has a std of at most the per-subset std, so 3 std is a 3-sigma bound.
    assert abs(mean) < 3 * std
    shifted, shifted_std, _ = scores.kid(a, _gauss(1500, 16, 5, mean=0.5), subsets=10, subset_size=400)
    assert shifted > 10 * shifted_std and shifted > 20 * abs(mean)


def test_kid_subset_is_clipped_to_the_sample_count():
    assert scores.kid(_gauss(100, 4, 6), _gauss(80, 4, 7), subsets=5)[2] == 80


def test_knn_radii_on_a_line():
    x = torch.arange(10, dtype=torch.float64)[:, None]  # points 0, 1, ..., 9
    radii = scores.knn_radii(x, k=3)
    # point 0: neighbours at 1, 2, 3 -> 3; point 5: at 1, 1, 2 -> 2; point 9: at 1, 2, 3 -> 3
    assert radii.tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]


def test_precision_recall_identical_subset_and_shifted_sets():
    a = _gauss(800, 8, 8)
    assert scores.precision_recall(a, a) == (1.0, 1.0)
    # Fakes that are real points lie in the real manifold: precision 1 exactly.
    precision, recall = scores.precision_recall(a, a[:200])
    assert precision == 1.0 and recall < 1.0
    p_shift, r_shift = scores.precision_recall(a, a + 3.0)
    assert p_shift < 0.2 and r_shift < 0.2
    p_small, r_small = scores.precision_recall(a, a + 0.5)
    assert p_shift < p_small < 1.0 and r_shift < r_small < 1.0


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(EvalError, match="k=3"):
        scores.precision_recall(_gauss(3, 2, 0), _gauss(10, 2, 1))


def test_intra_fid_is_per_class_and_their_mean(digit_features):
    feats, labels = digit_features
    real, fake = feats[0.0], feats[0.2]
    mean, per_class = scores.intra_fid(real, labels, fake, labels, 10)
    assert len(per_class) == 10 and mean == pytest.approx(sum(per_class) / 10)
    assert per_class[3] == pytest.approx(scores.fid(real[labels == 3], fake[labels == 3]))
    # Class 0's value depends only on class-0 samples.
    worse = fake.clone()
    worse[labels == 1] += 5.0
    _, per_class_worse = scores.intra_fid(real, labels, worse, labels, 10)
    assert per_class_worse[0] == pytest.approx(per_class[0]) and per_class_worse[1] > per_class[1]


def test_intra_fid_names_the_fix_when_a_class_has_no_samples(digit_features):
    feats, labels = digit_features
    keep = labels != 4
    with pytest.raises(EvalError, match="class 4.*--num-samples"):
        scores.intra_fid(feats[0.0], labels, feats[0.0][keep], labels[keep], 10)


def test_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert scores.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
