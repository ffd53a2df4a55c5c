"""The feature cache (memory and disk), the head-is-output check, and the seeded epoch sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetl.finetune.distributed import EpochSampler, ShardSampler
from edgetl.finetune.features import FeatureBatches, extract_features, head_is_output
from edgetl.zoo.catalog import build_architecture, get_card, replace_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(n=10, bs=4, res=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, res, res, generator=g)
    y = torch.arange(n) % 3

    class Loader:
        dataset = range(n)

        def __iter__(self):
            for i in range(0, n, bs):
                yield x[i : i + bs], y[i : i + bs]

    return Loader(), x, y


def _model(name="mobilenet_v3_small"):
    card = get_card(name)
    torch.manual_seed(0)
    model = build_architecture(name)
    replace_head(model, card, 3)
    return model, card


def test_features_are_the_head_inputs_in_memory_and_on_disk(tmp_path):
    model, card = _model()
    loader, x, y = _batches()
    memory = extract_features(model, card.head_path, loader)
    disk = extract_features(model, card.head_path, loader, max_memory_mb=0.001, disk_dir=tmp_path, name="train")
    assert memory.path is None and isinstance(memory.features, torch.Tensor)
    assert disk.path == tmp_path / "train.npy" and disk.path.is_file()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert memory.features.shape == (10, 1024) and torch.equal(memory.labels, y)

    seen = []
    model.get_submodule(card.head_path).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.allclose(memory.features, seen[0], atol=1e-5)  # exactly what the head sees in eval mode
    index = torch.tensor([7, 2, 9])
    assert torch.equal(disk.rows(index), memory.rows(index))
    assert isinstance(model.get_submodule(card.head_path), nn.Linear)  # the head is put back
    assert not model.training


def test_head_is_output_detects_heads_followed_by_other_layers():
    resnet, card = _model("resnet18")
    assert head_is_output(resnet, card.head_path, torch.zeros(1, 3, 32, 32))
    squeeze, card = _model("squeezenet1_0")  # 1x1-conv head, then ReLU and pooling
    assert not head_is_output(squeeze, card.head_path, torch.zeros(1, 3, 64, 64))


def test_feature_batches_follow_the_sampler():
    model, card = _model()
    loader, _, y = _batches()
    cache = extract_features(model, card.head_path, loader)
    sampler = EpochSampler(len(cache), seed=3)
    batches = FeatureBatches(cache, batch_size=4, sampler=sampler)
    assert len(batches) == 3
    sampler.set_epoch(1)
    order = list(sampler)
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(labels, y[order])


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(5)
    assert list(a) != list(b)
    # two ranks: disjoint halves of the same epoch order, equal lengths
    r0, r1 = EpochSampler(51, seed=1, num_replicas=2, rank=0), EpochSampler(51, seed=1, num_replicas=2, rank=1)
    assert len(r0) == len(r1) == 26 and set(r0) | set(r1) == set(range(51))
    # balanced: a 1-in-10 class is drawn about as often as the other
    labels = [0] * 90 + [1] * 10
    counts = torch.bincount(torch.tensor([labels[i] for i in EpochSampler(100, 0, [1 / 90] * 90 + [1 / 10] * 10)]))
    assert 30 <= counts[1] <= 70
    assert list(ShardSampler(5, 2, 1)) == [1, 3]
