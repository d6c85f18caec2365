"""Class-balanced batches (cohort.datasets.sampling, ``data.sampler``): their make-up, their
determinism, their errors, and how a dataset serves them (through a long tail and a validation split)."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from cohort.config.errors import CohortError
from cohort.datasets import TensorSplits, check_sampler, class_balanced_batches
from cohort.datasets.long_tail import LongTailed
from cohort.datasets.validation import ValidationSplit
from cohort.topology import topology_from_dict


def labels_of(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Shuffled labels with ``counts[c]`` samples of class c."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_every_batch_holds_distinct_classes_m_images_of_each():
    targets = labels_of([30, 25, 1, 12, 40, 3, 22, 18])  # class 2 has one image, class 5 three
    for m, batch_size in [(2, 8), (3, 12), (2, 2), (4, 8)]:
        batches = class_balanced_batches(targets, batch_size, m, seed=7, epoch=1)
        assert len(batches) == len(targets) // batch_size
        for batch in batches:
            assert batch.dtype == torch.long and len(batch) == batch_size == len(set(batch.tolist()))
            per_class = Counter(targets[batch].tolist())
            assert len(per_class) == batch_size // m and set(per_class.values()) == {m}
            assert 2 not in per_class and (m < 4 or 5 not in per_class)  # never a class with fewer than m images
            # each class's m images are contiguous in the batch
            blocks = targets[batch].view(-1, m)
            assert (blocks == blocks[:, :1]).all()


def test_a_class_serves_each_of_its_images_once_before_it_is_reshuffled():
    counts = [9, 7, 12, 10, 8]
    targets = labels_of(counts, seed=1)
    m = 2
    seen: dict[int, list[int]] = {c: [] for c in range(len(counts))}
    for batch in class_balanced_batches(targets, 4, m, seed=3, epoch=1):
        for index in batch.tolist():
            seen[int(targets[index])].append(index)
    wrapped = 0
    for cls, indices in seen.items():
        per_pass = counts[cls] // m * m  # a pass uses all but the last count % m images
        for start in range(0, len(indices), per_pass):
            chunk = indices[start:start + per_pass]
            assert len(set(chunk)) == len(chunk), f"class {cls} repeats an image within a pass"
        wrapped += len(indices) > per_pass
    # Classes are drawn uniformly, whatever their size: some small class ran out and was reshuffled.
    assert wrapped > 0


def test_batches_depend_on_seed_and_epoch_only():
    targets = labels_of([20] * 10)
    first = class_balanced_batches(targets, 10, 2, seed=5, epoch=2)
    again = class_balanced_batches(targets.clone(), 10, 2, seed=5, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again) == 20
    for other in (class_balanced_batches(targets, 10, 2, seed=5, epoch=3),
                  class_balanced_batches(targets, 10, 2, seed=6, epoch=2)):
        assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("batch_size, m, message", [
    (8, 1, "m_per_class: must be at least 2 (an image needs another of its class), not 1"),
    (9, 2, "batch_size: 9 is not a multiple of sampler.m_per_class (2)"),
    # 4 classes have at least 2 images (class 2 has one): 5 classes of 2 cannot be drawn
    (10, 2, "batch_size: 10 images at 2 per class need 5 classes with at least 2 training images; "
            "the training set has 4 (a batch of at most 8)"),
])
def test_batches_that_cannot_be_drawn_are_refused(batch_size, m, message):
    targets = labels_of([30, 25, 1, 12, 40])
    with pytest.raises(ValueError) as error:
        class_balanced_batches(targets, batch_size, m, seed=0, epoch=1)
    assert str(error.value) == message


def dataset_of(counts: list[int]) -> TensorSplits:
    """Training image i is the constant i (so a served image tells its index)."""
    labels = labels_of(counts, seed=2)
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)
    return TensorSplits("numbered", (images, labels), (images[:4], labels[:4]), len(counts))


def test_check_sampler_names_the_field():
    info = dataset_of([30, 25, 1, 12, 40]).info
    check_sampler(info, 8, SimpleNamespace(m_per_class=2))
    check_sampler(info, 9, None)  # no sampler: nothing to check
    with pytest.raises(CohortError) as error:
        check_sampler(info, 10, SimpleNamespace(m_per_class=2))
    assert error.value.where == "data.batch_size"
    assert error.value.message.startswith("10 images at 2 per class need 5 classes")
    with pytest.raises(CohortError) as error:
        check_sampler(info, 8, SimpleNamespace(m_per_class=1))
    assert error.value.where == "data.sampler.m_per_class"


def test_a_dataset_serves_class_balanced_batches_from_its_training_images_only():
    inner = dataset_of([40, 30, 24, 20, 16, 12])
    data = ValidationSplit(LongTailed(inner, imbalance=3.0, profile="exponential"), fraction=0.25, seed=4)
    # what the long tail and the validation split left for training, as indices of the inner images
    trained = set(data.inner.keep[data.keep].tolist())
    held_out = set(data.inner.keep[data.val].tolist())
    assert held_out and not trained & held_out
    sampler = SimpleNamespace(m_per_class=2)
    served = list(data.train_batches(6, seed=1, epoch=1, sampler=sampler))
    assert len(served) == data.info.train_size // 6
    for images, labels in served:
        numbers = images.flatten().long().tolist()
        assert len(labels) == 6 and set(numbers) <= trained
        assert torch.equal(labels, inner.train_y[numbers])  # each image with its own label
        assert set(Counter(labels.tolist()).values()) == {2} and len(set(labels.tolist())) == 3
    again = list(data.train_batches(6, seed=1, epoch=1, sampler=sampler))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(served, again))
    # without a sampler, the shuffled epoch as before (its last batch may be larger)
    plain = list(data.train_batches(6, seed=1, epoch=1))
    assert sum(len(y) for _, y in plain) == data.info.train_size


def topology(data: dict):
    return topology_from_dict({"name": "t", "data": data, "peers": {"a": {"model": "mlp_tiny"}}})


def test_the_sampler_section_of_a_topology():
    assert topology({"batch_size": 64}).data.sampler is None
    assert topology({"batch_size": 64, "sampler": {"m_per_class": 4}}).data.sampler.m_per_class == 4
    with pytest.raises(CohortError, match=r"data\.sampler\.m_per_class: batch_size 63 is not a multiple of "
                                          r"m_per_class 2"):
        topology({"batch_size": 63, "sampler": {"m_per_class": 2}})
    with pytest.raises(CohortError, match=r"data\.sampler\.m_per_class: must be greater than or equal to 2"):
        topology({"batch_size": 64, "sampler": {"m_per_class": 1}})
    with pytest.raises(CohortError, match=r"data\.sampler\.m_per_class: missing"):
        topology({"sampler": {}})
