"""The batch protocol: a dataset serves batches that are identical on every peer.

Every peer builds the same dataset and draws its batches in an order, and with an augmentation,
that are functions of ``(seed, epoch, batch number)`` alone: all peers see the same samples, the
same crops and the same flips without any coordination, whatever ``num_workers`` is (and without
sharding: peers are different networks, not replicas).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cohort.config.errors import CohortError
from cohort.datasets.sampling import class_balanced_batches
from cohort.datasets.shared import from_shared, held_bytes, to_shared

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    train_size: int
    test_size: int
    train_class_counts: tuple[int, ...]
    class_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the user should know about the data (skipped rows, ...)
    input_size: tuple[int, ...] = ()  # one input's shape, (C, H, W): the plan estimates each peer's compute from it
    val_size: int = 0  # training images held out as the validation split (data.val_fraction)
    # Bytes of the arrays the dataset holds in memory, put once in Ray's object store and read there
    # by every peer on a node (cohort.datasets.shared); 0: its batches are read from files.
    memory_bytes: int = 0
    # Its training batches are read from files and decoded batch by batch (image folders): the work
    # a batch producer (data.pipeline, cohort.datasets.producer) does once per node instead of once per peer.
    decodes_batches: bool = False
    # Streamed (data.pipeline: stream, cohort.datasets.streaming): the shuffle window in row groups (0: not
    # streamed) and the most the node's producer holds (decoded batches and encoded row groups).
    stream_window: int = 0
    stream_bytes: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def batch_indices(order: torch.Tensor, batch_size: int, shards: int = 1) -> list[torch.Tensor]:
    batches = list(torch.split(order, batch_size))
    # A final batch of one sample breaks batch normalization in training mode, and one smaller
    # than the number of replicas' shards would leave a replica without data: fold it in.
    if len(batches) > 1 and len(batches[-1]) < max(2, shards):
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def disjoint_part(batches: list, index: int, count: int) -> list:
    """Part ``index`` of ``count`` of an epoch's batches: every ``count``-th from the ``index``-th,
    the same number for every part (the batches left over after the last full round are left out)."""
    usable = len(batches) // count * count
    return batches[index:usable:count]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The augmentation seed of one training batch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class CohortDataset:
    """A train and a test split, served as batches.

    Subclasses implement ``make_batch(indices, train, seed)``, a pure function of its arguments,
    so that batches can be built in DataLoader worker processes in any order. Pickled (through
    Ray's object store), a dataset's tensors travel as numpy arrays and come back as tensors over
    the store's shared memory (``cohort.datasets.shared``): nothing may write into them.
    """

    info: DatasetInfo

    def __getstate__(self) -> dict:
        return to_shared(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(from_shared(state))

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """How a raw image becomes a network's input, as data (recorded with a peer logged as an
        MLflow model, so that its users can prepare their own images): empty when unknown."""
        return {}

    @property
    def train_targets(self) -> torch.Tensor:
        """Every training sample's label, in index order."""
        raise NotImplementedError

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        """Training samples served as test samples are (no augmentation): a validation split's batches."""
        raise NotImplementedError

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The validation split's batches (none without one: ``cohort.datasets.validation``)."""
        return iter(())

    def train_batches(self, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                      shards: int = 1, sampler: Any = None, part: tuple[int, int] | None = None) -> Iterator[Batch]:
        """The epoch's whole batches (``shards``: how many replicas will split each of them).

        ``part``: ``(index, count)``, only this part of the epoch's batches, ``disjoint_part``
        (codistillation's disjoint data: each peer its own batches of the same plan).

        ``sampler``: the topology's ``data.sampler`` (``cohort.topology.SamplerConfig``): with one,
        class-balanced batches of exactly ``batch_size`` (``cohort.datasets.sampling``) drawn from
        ``train_targets``, in the same index space as ``make_batch``'s training indices (what a long
        tail or a validation split kept); each class's ``m`` images are contiguous in the batch.
        """
        plan = self.train_plan(batch_size, seed, epoch, shards, sampler)
        return self._serve(plan if part is None else disjoint_part(plan, *part), num_workers)

    def train_plan(self, batch_size: int, seed: int, epoch: int, shards: int = 1, sampler: Any = None) -> list:
        """The epoch's whole batches as ``make_batch``'s arguments, ``(indices, True, batch seed)``, in order."""
        if sampler is None:
            indices = batch_indices(epoch_order(self.info.train_size, seed, epoch), batch_size, shards)
        else:
            indices = class_balanced_batches(self.train_targets, batch_size, sampler.m_per_class, seed, epoch)
        return [(index, True, batch_seed(seed, epoch, number)) for number, index in enumerate(indices)]

    def test_batches(self, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
        plan = [(index, False, 0) for index in torch.arange(self.info.test_size).split(batch_size)]
        return self._serve(plan, num_workers)

    def _serve(self, plan: list, num_workers: int) -> Iterator[Batch]:
        if num_workers == 0:
            return (self.make_batch(*item) for item in plan)
        # Worker processes build whole batches ahead of training; the order is kept.
        loader = torch.utils.data.DataLoader(_Plan(self, plan), batch_size=None, shuffle=False,
                                             num_workers=num_workers, prefetch_factor=2)
        return iter(loader)


class _Plan(torch.utils.data.Dataset):
    def __init__(self, dataset: CohortDataset, plan: list):
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, number: int) -> Batch:
        return self.dataset.make_batch(*self.plan[number])


class TensorSplits(CohortDataset):
    """Float inputs ``[N, C, H, W]`` held in memory, without augmentation (digits)."""

    def __init__(self, name: str, train: Batch, test: Batch, num_classes: int, preprocessing: dict | None = None):
        self.train_x, self.train_y = train
        self.test_x, self.test_y = test
        self._preprocessing = dict(preprocessing or {})
        self.info = DatasetInfo(name, num_classes, self.train_x.shape[1], len(self.train_y), len(self.test_y),
                                class_counts(self.train_y, num_classes), input_size=tuple(self.train_x.shape[1:]),
                                memory_bytes=held_bytes(vars(self)))

    @property
    def train_targets(self) -> torch.Tensor:
        return self.train_y

    def preprocessing(self) -> dict:
        return dict(self._preprocessing)

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        if train:
            return self.train_x[indices], self.train_y[indices]
        return self.test_x[indices], self.test_y[indices]

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        return self.train_x[indices], self.train_y[indices]


def class_counts(labels: torch.Tensor, num_classes: int) -> tuple[int, ...]:
    """How many of ``labels`` each class has."""
    return tuple(int(c) for c in torch.bincount(labels, minlength=num_classes))


def need_root(dataset: str, root: str | None, download: bool, what: str) -> Path:
    """The dataset's ``root`` as a path; ``what``: what it should be, for the errors."""
    if root is None:
        raise CohortError(f"dataset {dataset!r} needs a root: {what}", "data.root")
    path = Path(root).expanduser()
    if not path.exists() and not download:
        raise CohortError(f"{str(path)!r} does not exist ({what})", "data.root")
    return path
