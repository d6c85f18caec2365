"""The validation split (``data.val_fraction``): a stratified, seeded share of the training set held
out from training, served without augmentation. The same images for every peer and every run with
the same seed; with a long-tailed set it is carved from what the long tail kept, class by class."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from cohort.datasets.base import Batch, CohortDataset, DatasetInfo, class_counts

SPLIT_SEED = 0x5A11D  # mixed with the topology's seed: the split differs from the batch order's draws


def validation_counts(train_class_counts: tuple[int, ...] | list[int], fraction: float) -> list[int]:
    """Images each class gives to the validation split: ``round(fraction · n)``, at least one where
    the class has two or more, and always leaving one for training (none of a class of one)."""
    counts = []
    for n in train_class_counts:
        if n < 2 or fraction <= 0:
            counts.append(0)
            continue
        counts.append(min(max(1, round(fraction * n)), n - 1))
    return counts


def split_info(info: DatasetInfo, fraction: float) -> DatasetInfo:
    """The dataset's sizes once the validation split is held out."""
    held = validation_counts(info.train_class_counts, fraction)
    kept = tuple(n - v for n, v in zip(info.train_class_counts, held))
    return replace(info, train_size=sum(kept), train_class_counts=kept, val_size=sum(held))


def validation_split(targets: torch.Tensor, info: DatasetInfo, fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, val)``: the positions in ``targets`` (the training labels, in order) that stay for
    training and those held out, ``validation_counts`` of each class chosen by ``seed``, both sorted.
    The same images whichever pipeline serves the set (``cohort.datasets.streaming``)."""
    held = validation_counts(info.train_class_counts, fraction)
    generator = torch.Generator().manual_seed(SPLIT_SEED + int(seed))
    chosen = []
    for cls, count in enumerate(held):
        members = torch.nonzero(targets == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    val = torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(targets), dtype=torch.bool)
    mask[val] = False
    keep = torch.nonzero(mask).flatten()
    assert split_info(info, fraction).train_class_counts == class_counts(targets[keep], info.num_classes)
    return keep, val


class ValidationSplit(CohortDataset):
    """``inner`` with ``validation_counts`` images of each class moved from training to validation,
    chosen by ``seed``; the test split is untouched."""

    def __init__(self, inner: CohortDataset, fraction: float, seed: int):
        self.inner = inner
        self.keep, self.val = validation_split(inner.train_targets, inner.info, fraction, seed)
        self.info = split_info(inner.info, fraction)

    @property
    def train_targets(self) -> torch.Tensor:
        return self.inner.train_targets[self.keep]

    @property
    def val_targets(self) -> torch.Tensor:
        return self.inner.train_targets[self.val]

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        return self.inner.make_batch(self.keep[indices] if train else indices, train, seed)

    def preprocessing(self) -> dict:
        return self.inner.preprocessing()

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        return self.inner.plain_train_batch(self.keep[indices])

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        return (self.inner.plain_train_batch(self.val[chunk]) for chunk in torch.arange(len(self.val)).split(batch_size))
