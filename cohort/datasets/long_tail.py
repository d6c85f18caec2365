"""Long-tailed training sets: a subsample of every class, as in LDAM-DRW."""
from __future__ import annotations

from dataclasses import replace

import torch

from cohort.datasets.base import Batch, CohortDataset, DatasetInfo, class_counts

LONG_TAIL_SEED = 0  # which images a long-tailed set keeps is the same for every run


def long_tail_counts(n_max: int, num_classes: int, imbalance: float, profile: str) -> list[int]:
    """Images to keep per class (class 0 is the head), as in LDAM-DRW.

    ``exponential``: ``int(n_max · imbalance^(−i/(C−1)))``; ``step``: the first half of the
    classes keep ``n_max``, the others ``int(n_max / imbalance)``.
    """
    if profile == "exponential":
        return [int(n_max * imbalance ** (-i / max(num_classes - 1, 1))) for i in range(num_classes)]
    return [n_max if i < num_classes // 2 else int(n_max / imbalance) for i in range(num_classes)]


def long_tail_keep(targets: torch.Tensor, info: DatasetInfo, imbalance: float,
                   profile: str) -> tuple[torch.Tensor, DatasetInfo]:
    """The training images a long-tailed set keeps (positions in ``targets``, the training labels, in
    order) and the dataset's info with them: ``long_tail_counts`` of each class, drawn by
    ``LONG_TAIL_SEED``. The same images whichever pipeline serves the set (``cohort.datasets.streaming``)."""
    wanted = long_tail_counts(max(info.train_class_counts), info.num_classes, imbalance, profile)
    generator = torch.Generator().manual_seed(LONG_TAIL_SEED)
    kept = []
    for cls, count in enumerate(wanted):
        members = torch.nonzero(targets == cls).flatten()
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    keep = torch.cat(kept).sort().values
    counts = class_counts(targets[keep], info.num_classes)
    note = long_tail_note(profile, imbalance, len(keep))
    return keep, replace(info, train_size=len(keep), train_class_counts=counts, notes=info.notes + (note,))


class LongTailed(CohortDataset):
    """A dataset whose training split keeps ``long_tail_counts`` images per class; the test split
    is untouched."""

    def __init__(self, inner: CohortDataset, imbalance: float, profile: str):
        self.inner = inner
        self.keep, self.info = long_tail_keep(inner.train_targets, inner.info, imbalance, profile)

    @property
    def train_targets(self) -> torch.Tensor:
        return self.inner.train_targets[self.keep]

    def preprocessing(self) -> dict:
        return self.inner.preprocessing()

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        return self.inner.make_batch(self.keep[indices] if train else indices, train, seed)

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        return self.inner.plain_train_batch(self.keep[indices])


def long_tail_note(profile: str, imbalance: float, images: int) -> str:
    """The plan's note on a long-tailed training set."""
    return f"long-tailed training set ({profile}, imbalance {imbalance:g}): {images} images"
