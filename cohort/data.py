"""Datasets, and batches that are identical on every peer.

Every peer builds the same dataset and draws its batches from a generator seeded by
``(seed, epoch)`` alone, so all peers see the same samples in the same order without any
coordination (and without sharding: peers are different networks, not replicas).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from cohort.errors import CohortError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    train_size: int
    test_size: int
    train_class_counts: tuple[int, ...]


@dataclass
class InMemorySplits:
    """A dataset small enough to hold as tensors: inputs ``[N, C, H, W]`` float, labels ``[N]`` long."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def info(self) -> DatasetInfo:
        counts = torch.bincount(self.train_y, minlength=self.num_classes)
        return DatasetInfo(
            name=self.name,
            num_classes=self.num_classes,
            in_channels=self.train_x.shape[1],
            train_size=len(self.train_y),
            test_size=len(self.test_y),
            train_class_counts=tuple(int(c) for c in counts),
        )

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[Batch]:
        order = epoch_order(len(self.train_y), seed, epoch)
        for index in batch_indices(order, batch_size):
            yield self.train_x[index], self.train_y[index]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.test_y), batch_size):
            yield self.test_x[start:start + batch_size], self.test_y[start:start + batch_size]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def batch_indices(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    batches = list(torch.split(order, batch_size))
    # A final batch of one sample breaks batch normalization in training mode: fold it in.
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


DATASETS: dict[str, Callable[..., InMemorySplits]] = {}


def register_dataset(name: str):
    def decorator(loader: Callable[..., InMemorySplits]):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = loader
        return loader

    return decorator


@register_dataset("digits")
def load_digits(root: str | None = None, download: bool = False, seed: int = 0) -> InMemorySplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images), split 80/20 by a fixed seed.

    The split seed is fixed (not the topology's seed) so that every run evaluates on the same
    test images; pixel values are standardized with the training split's mean and std.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=0, stratify=labels.numpy()
    )
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return InMemorySplits(
        name="digits",
        train_x=(train_x - mean) / std,
        train_y=labels[train_idx],
        test_x=(test_x - mean) / std,
        test_y=labels[test_idx],
        num_classes=10,
    )


def load_dataset(name: str, root: str | None, download: bool) -> InMemorySplits:
    if name not in DATASETS:
        raise CohortError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})", "data.dataset")
    if root is not None and not download and not Path(root).exists():
        raise CohortError(f"dataset root {root!r} does not exist (set data.download: true to fetch it)", "data.root")
    return DATASETS[name](root=root, download=download)
