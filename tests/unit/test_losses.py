"""Adversarial losses and the orthogonal regularizer on hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layers.spectral import sn
from pipeline.losses.adversarial import LOSSES, get_loss, hinge_d, hinge_g, logistic_d, logistic_g
from pipeline.losses.regularizers import orthogonal_penalty


def test_hinge_d_hand_computed():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75
    assert hinge_d(real, fake).item() == pytest.approx(1.0, abs=1e-7)


def test_hinge_d_zero_when_margins_met():
    assert hinge_d(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -3.0])).item() == 0.0


def test_hinge_g_is_negative_mean():
    assert hinge_g(torch.tensor([1.0, 3.0, -1.0])).item() == pytest.approx(-1.0, abs=1e-7)


def test_logistic_at_zero_logits():
    zeros = torch.zeros(7)
    assert logistic_d(zeros, zeros).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    assert logistic_g(zeros).item() == pytest.approx(math.log(2), abs=1e-6)


def test_logistic_d_equals_binary_cross_entropy():
    torch.manual_seed(0)
    real, fake = torch.randn(16) * 3, torch.randn(16) * 3
    bce = F.binary_cross_entropy_with_logits(real, torch.ones(16)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros(16)
    )
    torch.testing.assert_close(logistic_d(real, fake), bce)


def test_logistic_g_does_not_saturate():
    # Non-saturating loss: d/dl softplus(-l) = -sigmoid(-l) -> -1 as D confidently rejects fakes.
    fake = torch.full((4,), -20.0, requires_grad=True)
    logistic_g(fake).backward()
    torch.testing.assert_close(fake.grad, torch.full((4,), -0.25), atol=1e-6, rtol=0)


def test_losses_are_scalars_and_registry():
    assert set(LOSSES) == {"hinge", "logistic"}
    assert get_loss("hinge") == (hinge_d, hinge_g)
    assert get_loss("logistic") == (logistic_d, logistic_g)
    real, fake = torch.randn(5), torch.randn(5)
    for d_fn, g_fn in LOSSES.values():
        assert d_fn(real, fake).shape == () and g_fn(fake).shape == ()


def test_get_loss_unknown_lists_names():
    with pytest.raises(ValueError, match="hinge.*logistic"):
        get_loss("wasserstein")


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize("variant", ["offdiag", "full"])
def test_ortho_penalty_zero_for_orthogonal(variant):
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    layer = _linear_with(q.float())
    assert orthogonal_penalty(layer, variant=variant).item() == pytest.approx(0.0, abs=1e-6)


def test_ortho_penalty_offdiag_ignores_row_norms():
    q, _ = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))
    layer = _linear_with((torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64)) @ q).float())
    assert orthogonal_penalty(layer, variant="offdiag").item() == pytest.approx(0.0, abs=1e-5)
    # W W^T = diag(4, 9): full = (4 - 1)^2 + (9 - 1)^2 = 73
    assert orthogonal_penalty(layer, variant="full").item() == pytest.approx(73.0, abs=1e-4)


def test_ortho_penalty_hand_computed_2x2():
    layer = _linear_with(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # W W^T = [[5, 11], [11, 25]]: offdiag = 2 * 11^2 = 242; full = 4^2 + 242 + 24^2 = 834
    assert orthogonal_penalty(layer, variant="offdiag").item() == pytest.approx(242.0)
    assert orthogonal_penalty(layer, variant="full").item() == pytest.approx(834.0)


def test_ortho_penalty_positive_for_random_and_sums_layers():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 8), nn.Conv2d(4, 6, 3)
    total = orthogonal_penalty(nn.Sequential(a, b))
    assert total.item() > 0
    torch.testing.assert_close(total, orthogonal_penalty(a) + orthogonal_penalty(b))


def test_ortho_penalty_uses_unnormalised_weight_of_sn_layers():
    layer = sn(_linear_with(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), n_power_iterations=1, eps=1e-6)
    assert orthogonal_penalty(layer, variant="offdiag").item() == pytest.approx(242.0)
    penalty = orthogonal_penalty(layer)
    penalty.backward()
    assert layer.parametrizations.weight.original.grad is not None


def test_ortho_penalty_skips_embeddings():
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    model = nn.Sequential(nn.Embedding(10, 4), _linear_with(q))
    assert orthogonal_penalty(model).item() == pytest.approx(0.0, abs=1e-6)


def test_ortho_penalty_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        orthogonal_penalty(nn.Linear(2, 2), variant="diag")
