"""Reference statistics cache, dataset checksum, label allocation, sampling and the protocol record."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.data.shards import iterate_shards, read_manifest, write_shards
from pipeline.metrics.domain_net import DomainNet
from pipeline.metrics.errors import EvalError
from pipeline.metrics.evaluate import (check_metrics, evaluate, generate, parse_metrics, stratified_labels,
                                       truncation_mode)
from pipeline.metrics.features import FeatureNet
from pipeline.metrics.real_data import class_counts, dataset_checksum
from pipeline.metrics.reference import reference_features


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "digits-16"
    write_shards("digits", path, resolution=16, shard_size=500, progress=False)
    return path, read_manifest(path)


class CountingNet(FeatureNet):
    """A domain-type FeatureNet that counts the images it embeds."""

    def __init__(self, net_id: str = "net-a") -> None:
        torch.manual_seed(0)
        super().__init__(DomainNet(channels=1, resolution=16, num_classes=10, width=4).eval(), kind="domain",
                         net_id=net_id, info={"path": "memory"})
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return super().forward(x)


class ToyG(nn.Module):
    """G(z, y): a 16x16 image whose pixels are tanh of z's entries plus a class offset (BigGAN-style truncation)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.z_dim, self.num_classes, self.resolution, self.channels = 256, num_classes, 16, 1

    def forward(self, z, y=None):
        offset = 0 if y is None else (y.float() / 10)[:, None]
        return torch.tanh(z + offset).view(-1, 1, 16, 16)


class ToyStyleG(ToyG):
    def forward(self, z, y=None, *, truncation_psi: float = 1.0):
        return super().forward(z * truncation_psi, y)


def test_dataset_checksum_follows_the_shards_not_the_path(digits16):
    _, manifest = digits16
    moved = {**manifest, "source": "/elsewhere"}
    assert dataset_checksum(moved) == dataset_checksum(manifest)
    changed = copy.deepcopy(manifest)
    changed["shards"][0]["sha256"] = "0" * 64
    assert dataset_checksum(changed) != dataset_checksum(manifest)


def test_reference_cache_is_hit_the_second_time(digits16, tmp_path):
    shard_dir, manifest = digits16
    net = CountingNet()
    first = reference_features(net, manifest, shard_dir, tmp_path, max_samples=300, batch_size=128, progress=False)
    assert not first.from_cache and net.images == 300 and first.features.shape == (300, 16)
    assert first.labels.tolist() == [y for _, _, y in iterate_shards(shard_dir)][:300]  # written order
    second = reference_features(net, manifest, shard_dir, tmp_path, max_samples=300, progress=False)
    assert second.from_cache and net.images == 300, "the feature network ran again"
    assert torch.equal(second.features, first.features) and torch.equal(second.labels, first.labels)
    # The key: another network, or another number of real samples, is another file.
    other = CountingNet("net-b")
    assert not reference_features(other, manifest, shard_dir, tmp_path, max_samples=300, progress=False).from_cache
    assert not reference_features(net, manifest, shard_dir, tmp_path, max_samples=200, progress=False).from_cache
    assert second.protocol()["num_real"] == 300 and second.protocol()["feature_net_id"] == "net-a"
    # A damaged cache file is recomputed, not trusted.
    first.path.write_bytes(b"not a torch file")
    assert not reference_features(net, manifest, shard_dir, tmp_path, max_samples=300, progress=False).from_cache


def test_stratified_labels_follow_the_class_frequencies(digits16):
    counts = class_counts(digits16[1])
    labels = stratified_labels(1000, counts)
    got = torch.bincount(labels, minlength=10)
    assert int(got.sum()) == 1000
    expected = torch.tensor(counts, dtype=torch.float64) * 1000 / sum(counts)
    assert (got - expected).abs().max() < 1  # largest remainder: within one of the exact quota
    assert stratified_labels(7, []).tolist() == [0] * 7


def test_generate_is_seeded_and_truncates(digits16):
    G = ToyG()
    labels = stratified_labels(40, class_counts(digits16[1]))
    a = torch.cat([x for x, _ in generate(G, labels, truncation=None, seed=3, batch_size=16, device="cpu",
                                          progress=False)])
    b = torch.cat([x for x, _ in generate(G, labels, truncation=None, seed=3, batch_size=40, device="cpu",
                                          progress=False)])
    assert torch.equal(a, b), "samples must not depend on the batch size"
    z = torch.cat([x for x, _ in generate(ToyG(num_classes=0), torch.zeros(40, dtype=torch.long), truncation=0.5,
                                          seed=3, batch_size=16, device="cpu", progress=False)]).atanh()
    assert z.abs().max() <= 0.5 + 1e-5  # BigGAN's truncation resamples |z| > threshold
    assert truncation_mode(ToyG()) == "z_threshold" and truncation_mode(ToyStyleG()) == "psi"


def test_every_value_carries_its_protocol(digits16, tmp_path):
    shard_dir, manifest = digits16
    net = CountingNet()
    ref = reference_features(net, manifest, shard_dir, tmp_path, progress=False)
    result = evaluate(ToyStyleG(), net, ref, metrics=["fid", "kid", "pr", "intra_fid", "accuracy"], num_samples=300,
                      class_counts=class_counts(manifest), truncation=0.7, seed=1, batch_size=128, kid_subsets=5,
                      kimg=12.5, progress=False)
    values, proto = result["metrics"], result["protocol"]
    assert {"fid", "kid", "kid_std", "precision", "recall", "intra_fid", "accuracy"} <= set(values)
    assert [f"intra_fid/{c}" in values for c in range(10)] == [True] * 10
    assert proto["feature_net"]["id"] == "net-a" and proto["feature_net"]["kind"] == "domain"
    assert proto["num_samples"] == 300 and proto["reference"]["num_real"] == 1797
    assert proto["reference"]["dataset_checksum"] == dataset_checksum(manifest)
    assert proto["truncation"] == {"value": 0.7, "kind": "psi"} and proto["generator"] == "G_ema"
    assert proto["kimg"] == 12.5 and proto["kid"]["subset_size"] == 300 and proto["pr"]["k"] == 3
    assert sum(proto["intra_fid"]["fake_per_class"]) == 300


def test_metric_choices_are_checked():
    with pytest.raises(EvalError, match="--metrics.*choose from fid,kid,pr,intra_fid,accuracy"):
        parse_metrics("fid,is")
    assert parse_metrics("fid, kid,fid") == ["fid", "kid"]
    ident = nn.Identity()
    ident.num_features = 4
    inception_like = FeatureNet(ident, kind="inception", net_id="x", info={})
    with pytest.raises(EvalError, match="accuracy needs a domain classifier"):
        check_metrics(["accuracy"], num_classes=10, net=inception_like)
    with pytest.raises(EvalError, match="class-conditional"):
        check_metrics(["fid", "intra_fid"], num_classes=0, net=inception_like)
    with pytest.raises(EvalError, match="classifies 10 classes but the generator has 5"):
        check_metrics(["accuracy"], num_classes=5, net=CountingNet())


def test_intra_fid_sample_count_is_checked_up_front(digits16):
    counts = class_counts(digits16[1])
    with pytest.raises(EvalError, match="--num-samples=15 leaves 1 sample.*set --num-samples to"):
        check_metrics(["intra_fid"], num_classes=10, net=CountingNet(), num_samples=15, class_counts=counts)
    check_metrics(["intra_fid"], num_classes=10, net=CountingNet(), num_samples=20, class_counts=counts)
