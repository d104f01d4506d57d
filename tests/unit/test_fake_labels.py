"""Grouped fake labels: groups of one class, the same global draw on every rank, class frequencies over time."""
import pytest
import torch

from pipeline.training.sampling import FakeLabels

PROBS = torch.tensor([0.5, 0.25, 0.125, 0.125])


def test_grouped_labels_come_in_groups_of_one_class():
    labels = FakeLabels(grouping="grouped", samples_per_class=4).draw(16, PROBS, rank=0, world=1, seed=3, index=0)
    groups = labels.view(4, 4)
    assert torch.equal(groups, groups[:, :1].expand(4, 4))


def test_ranks_take_consistent_slices_of_one_global_draw():
    draw = FakeLabels(grouping="grouped", samples_per_class=6)
    whole = draw.draw(20, PROBS, rank=0, world=1, seed=11, index=5)
    parts = [draw.draw(10, PROBS, rank=r, world=2, seed=11, index=5) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)  # 20 = 3 groups of 6 + a group cut to 2; group 2 spans both ranks
    assert (whole[:18].view(3, 6) == whole[:18].view(3, 6)[:, :1]).all()


@pytest.mark.parametrize("distribution", ["data", "uniform"])
def test_class_frequencies_over_time_follow_the_chosen_distribution(distribution):
    draw = FakeLabels(grouping="grouped", samples_per_class=8, distribution=distribution)
    labels = torch.cat([draw.draw(32, PROBS, rank=0, world=1, seed=0, index=s) for s in range(1000)])  # 4000 groups
    freq = torch.bincount(labels, minlength=4).float() / len(labels)
    target = PROBS if distribution == "data" else torch.full((4,), 0.25)
    # Group classes are iid: a frequency's standard deviation is sqrt(p(1-p)/4000) <= 0.0079; allow 4 sigma.
    assert (freq - target).abs().max() < 4 * 0.0079, freq


def test_iid_labels_and_config_errors():
    labels = FakeLabels().draw(64, PROBS, rank=0, world=1, seed=0, index=0)
    assert labels.shape == (64,) and len(labels.unique()) > 1
    assert torch.equal(FakeLabels(grouping="grouped").draw(5, None, rank=0, world=1, seed=0, index=0), torch.zeros(5).long())
    with pytest.raises(ValueError, match="model.fake_labels.grouping='groups' is not one of iid, grouped"):
        FakeLabels(grouping="groups")
    with pytest.raises(ValueError, match="model.fake_labels.samples_per_class must be >= 1"):
        FakeLabels(samples_per_class=0)
    with pytest.raises(ValueError, match="distribution='zipf'"):
        FakeLabels(distribution="zipf")
