"""Parquet image tables streamed row group by row group (``data.pipeline: stream``).

Nothing decodes the whole table. The dataset holds the table's layout (its files, row groups,
labels and splits: a few bytes a row) and the normalization; a training batch is read and decoded
from the row groups holding its rows, when the node's batch producer (``cohort.datasets.producer``)
makes it, and test batches by each worker, a row group at a time.

The epoch's order is a function of ``(seed, epoch)`` only (``stream_order``): a permutation of the
row groups, taken ``window`` row groups at a time, each window's rows shuffled. A batch then needs
the row groups of at most two windows, which the producer keeps (encoded) while it makes the
window's batches; ``data.memory_bound`` sets the window (``stream_window``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cohort.config.errors import CohortError, byte_size
from cohort.datasets.augment import channel_statistics, cifar_augment, normalize
from cohort.datasets.base import Batch, CohortDataset, DatasetInfo, batch_indices, batch_seed, class_counts, need_root
from cohort.datasets.parquet import decode_images, labels_and_splits, reading, table_files
from cohort.datasets.producer import CHUNK, LAG, WINDOW
from cohort.datasets.registry import register_stream

DEFAULT_WINDOW = 8  # row groups in a shuffle window when data.memory_bound is unset
# Batches the producer holds at most: WINDOW ahead of the furthest asked for, LAG behind it, the one asked
# for; those of a worker's chunk the producer has let go while the worker still reads them (CHUNK); and
# the working memory of making one (its uint8 images, their padded copy and crops, the floats and their
# normalization: about three batches of float32).
HELD_BATCHES = WINDOW + LAG + 1 + CHUNK + 3
SAMPLE_GROUPS, SAMPLE_ROWS = 16, 64  # normalization: up to 64 training images of each of up to 16 row groups


def stream_order(counts: list[int], seed: int, epoch: int, window: int) -> torch.Tensor:
    """An epoch's order of the training rows, grouped in row groups of ``counts`` rows each (the rows
    of group ``g`` follow those of group ``g - 1``): the groups permuted, then each ``window`` of
    consecutive groups of the permutation has its rows shuffled. A function of ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    groups = torch.randperm(len(counts), generator=generator).tolist()
    parts = [torch.empty(0, dtype=torch.int64)]
    for first in range(0, len(groups), window):
        rows = torch.cat([torch.arange(starts[g], starts[g + 1]) for g in groups[first:first + window]])
        parts.append(rows[torch.randperm(len(rows), generator=generator)])
    return torch.cat(parts)


def stream_memory(batch_bytes: int, group_bytes: int, window: int) -> int:
    """The most a node's producer holds: its batches (decoded, ``batch_bytes`` each), the row groups
    of two windows (encoded, ``group_bytes`` the largest) and the one being read."""
    return HELD_BATCHES * batch_bytes + (2 * window + 1) * group_bytes


def stream_window(bound: int | None, batch_bytes: int, group_bytes: int, groups: int) -> int:
    """The shuffle window, in row groups, that keeps ``stream_memory`` under ``bound`` (bytes; None:
    ``DEFAULT_WINDOW``), at most ``groups``; a bound that cannot hold a window of one row group is refused."""
    if bound is None:
        return max(1, min(DEFAULT_WINDOW, groups))
    window = (bound - stream_memory(batch_bytes, group_bytes, 0)) // (2 * group_bytes) if group_bytes else groups
    if window < 1:
        least = stream_memory(batch_bytes, group_bytes, 1)
        raise CohortError(f"{byte_size(bound)} cannot hold one window of the stream pipeline: {byte_size(least)} "
                          f"({HELD_BATCHES} decoded batches of {byte_size(batch_bytes)} and 3 row groups of up to "
                          f"{byte_size(group_bytes)} encoded); set at least that, or a smaller data.batch_size",
                          "data.memory_bound")
    return int(min(window, groups))


def decoded_batch_bytes(batch_size: int, input_size: tuple[int, ...]) -> int:
    """A training batch as the producer holds it: float32 inputs, int64 labels."""
    return batch_size * (int(torch.Size(input_size).numel()) * 4 + 8)


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into the table's files
    number: int  # the row group's number in its file
    rows: int
    encoded_bytes: int  # the image column's bytes, uncompressed (what a read of it holds)


class StreamingParquet(CohortDataset):
    """An image table read from its files batch by batch: the CIFAR training augmentation (a padded
    crop and a flip, seeded by the batch seed), normalized by ``mean`` and ``std``."""

    def __init__(self, files: list[Path], groups: list[RowGroup], labels: torch.Tensor, is_train: torch.Tensor,
                 num_classes: int, class_names: tuple[str, ...], mean: list[float], std: list[float],
                 input_size: tuple[int, ...], image_size: int | None, notes: tuple[str, ...] = (), window: int = 1,
                 padding: int = 4):
        self.files, self.groups, self.labels = [str(file) for file in files], groups, labels
        self.starts = torch.tensor([0] + [group.rows for group in groups]).cumsum(0)
        self.train_rows = torch.nonzero(is_train).flatten()
        self.test_rows = torch.nonzero(~is_train).flatten()
        self.val_rows = torch.empty(0, dtype=torch.int64)  # data.val_fraction's rows (``holding_out``)
        self.train_counts = torch.bincount(self.group_of(self.train_rows), minlength=len(groups)).tolist()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_size, self.padding, self.window = image_size, padding, window
        self._caches = {True: OrderedDict(), False: OrderedDict()}  # encoded row groups, for training / test batches
        train_labels = labels[self.train_rows]
        self.info = DatasetInfo("parquet", num_classes, input_size[0], len(self.train_rows), len(self.test_rows),
                                class_counts(train_labels, num_classes), class_names, notes, input_size,
                                decodes_batches=True, stream_window=window,
                                stream_bytes=stream_memory(0, self.group_bytes, window))

    @property
    def group_bytes(self) -> int:
        """The largest row group's encoded images."""
        return max(group.encoded_bytes for group in self.groups)

    def within(self, batch_size: int, bound: int | None) -> StreamingParquet:
        """This dataset with the shuffle window that keeps the pipeline under ``bound`` (``stream_window``)."""
        batch = decoded_batch_bytes(batch_size, self.info.input_size)
        window = stream_window(bound, batch, self.group_bytes, len(self.groups))
        bounded = copy.copy(self)
        bounded.window = window
        bounded.info = replace(self.info, stream_window=window, stream_bytes=stream_memory(batch, self.group_bytes, window))
        return bounded

    def long_tailed(self, imbalance: float, profile: str) -> StreamingParquet:
        """This table with a long-tailed training set (``data.long_tail``): the rows the in-memory
        pipeline keeps (``long_tail_keep``), still in the table's order."""
        from cohort.datasets.long_tail import long_tail_keep

        keep, info = long_tail_keep(self.train_targets, self.info, imbalance, profile)
        return self._training(self.train_rows[keep], info)

    def holding_out(self, fraction: float, seed: int) -> StreamingParquet:
        """This table with a validation split (``data.val_fraction``): the rows the in-memory pipeline
        holds out (``validation_split``) leave training and are read, unaugmented, by ``val_batches``."""
        from cohort.datasets.validation import split_info, validation_split

        keep, val = validation_split(self.train_targets, self.info, fraction, seed)
        held = self._training(self.train_rows[keep], split_info(self.info, fraction))
        held.val_rows = self.train_rows[val]
        return held

    def _training(self, rows: torch.Tensor, info: DatasetInfo) -> StreamingParquet:
        """A copy training on the table's ``rows`` (ascending: row groups stay contiguous for ``stream_order``)."""
        subset = copy.copy(self)
        subset.train_rows = rows
        subset.train_counts = torch.bincount(self.group_of(rows), minlength=len(self.groups)).tolist()
        subset.info = info
        subset._caches = {True: OrderedDict(), False: OrderedDict()}
        return subset

    def val_batches(self, batch_size: int):
        """The validation split's batches, unaugmented, read a row group at a time (the rows ascend)."""
        cache: OrderedDict = OrderedDict()
        for rows in self.val_rows.split(batch_size) if len(self.val_rows) else ():
            yield normalize(self.checked(self.read_images(rows, cache=cache, capacity=2)), self.mean, self.std), self.labels[rows]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_caches")
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._caches = {True: OrderedDict(), False: OrderedDict()}

    def group_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The row group of each of the table's ``rows``."""
        return torch.searchsorted(self.starts, rows, right=True) - 1

    @property
    def train_targets(self) -> torch.Tensor:
        return self.labels[self.train_rows]

    def preprocessing(self) -> dict:
        size = self.info.input_size
        return {"source": f"{size[1]}x{size[2]} images, uint8 pixels, channels first",
                "formula": "(pixels / 255 - mean) / std, per channel",
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def train_plan(self, batch_size: int, seed: int, epoch: int, shards: int = 1, sampler: Any = None) -> list:
        if sampler is not None:
            raise CohortError("the stream pipeline makes no class-balanced batches", "data.sampler")
        order = stream_order(self.train_counts, seed, epoch, self.window)
        return [(index, True, batch_seed(seed, epoch, number))
                for number, index in enumerate(batch_indices(order, batch_size, shards))]

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        rows = (self.train_rows if train else self.test_rows)[indices]
        images = self.checked(self.read_images(rows, cache=self._caches[train], capacity=2 * self.window if train else 2))
        if train:
            images = cifar_augment(images, seed, self.padding)
        return normalize(images, self.mean, self.std), self.labels[rows]

    def checked(self, images: torch.Tensor) -> torch.Tensor:
        """``images``, refused in one line unless of the table's first images' size."""
        if tuple(images.shape[1:]) != self.info.input_size:
            raise CohortError(f"images of size {tuple(images.shape[2:])} in the table, the first are "
                              f"{self.info.input_size[1:]} (set data.image_size to resize them all)", "data.root")
        return images

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        rows = self.train_rows[indices]
        return normalize(self.read_images(rows, cache=OrderedDict(), capacity=1), self.mean, self.std), self.labels[rows]

    def read_images(self, rows: torch.Tensor, cache: OrderedDict, capacity: int) -> torch.Tensor:
        """The decoded images of the table's ``rows`` (uint8 ``[N, C, H, W]``), their row groups read
        through ``cache`` (the ``capacity`` latest kept)."""
        groups = self.group_of(rows).tolist()
        blobs = self.encoded_rows(rows, cache, capacity)
        images, good = decode_images(blobs, self.image_size)
        if len(good) < len(blobs):
            bad = next(n for n in range(len(blobs)) if n not in set(good))
            group = self.groups[groups[bad]]
            raise CohortError(f"{Path(self.files[group.file]).name}, row group {group.number}: row "
                              f"{int(rows[bad]) - int(self.starts[groups[bad]])} does not decode (the stream "
                              "pipeline stops at a bad image: fix or drop its row)", "data.root")
        return images

    def encoded_rows(self, rows: torch.Tensor, cache: OrderedDict, capacity: int) -> list[bytes]:
        """The encoded images of the table's ``rows``."""
        return [self.encoded(group, cache, capacity)[row - int(self.starts[group])].as_py()
                for row, group in zip(rows.tolist(), self.group_of(rows).tolist())]

    def encoded(self, group: int, cache: OrderedDict, capacity: int) -> Any:
        """Row group ``group``'s image column (encoded bytes), read or from ``cache``."""
        if group in cache:
            cache.move_to_end(group)
            return cache[group]
        import pyarrow as pa
        import pyarrow.parquet as pq

        where = self.groups[group]
        with reading(self.files[where.file], f", row group {where.number}"):  # a file gone, a damaged row group
            column = pq.ParquetFile(self.files[where.file]).read_row_group(where.number, columns=["image"])["image"]
        cache[group] = column
        if len(cache) > capacity:
            while len(cache) > capacity:
                cache.popitem(last=False)
            pa.default_memory_pool().release_unused()  # what the evicted row groups held goes back to the system
        return column


@register_stream("parquet")
def stream_parquet(root: str | None = None, image_size: int | None = None) -> StreamingParquet:
    """The parquet table at ``root`` (a ``.parquet`` file or a folder of them) for streaming: its
    layout, labels and splits read, and the normalization (the schema metadata's ``mean`` and ``std``,
    comma-separated, else measured on a sample: ``sample_normalization``); no image is held."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = need_root("parquet", root, False, "a .parquet file or a folder of them, with columns image, label, split")
    files, class_names = table_files(path)
    groups, labels, is_train = [], [], []
    for index, file in enumerate(files):
        handle = pq.ParquetFile(file)
        image = handle.schema_arrow.get_field_index("image")
        for number in range(handle.metadata.num_row_groups):
            meta = handle.metadata.row_group(number)
            groups.append(RowGroup(index, number, meta.num_rows, meta.column(image).total_uncompressed_size))
        with reading(file):
            file_labels, file_train = labels_and_splits(handle.read(columns=["label", "split"]))
        labels.append(file_labels)
        is_train.append(file_train)
    labels, is_train = torch.cat(labels), torch.cat(is_train)
    if not is_train.any() or is_train.all():
        raise CohortError("the table needs rows of both splits, train and test", "data.root")
    num_classes = max(int(labels.max()) + 1, len(class_names))
    dataset = StreamingParquet(files, groups, labels, is_train, num_classes, class_names, [0.0] * 3, [1.0] * 3,
                               (3, 1, 1), image_size)
    metadata = pq.read_schema(files[0]).metadata or {}
    if b"mean" in metadata and b"std" in metadata:
        mean, std = (_floats(metadata[key]) for key in (b"mean", b"std"))
        shape, note = _first_shape(dataset), "normalization: the mean and std of the table's schema metadata"
    else:
        mean, std, shape, count = sample_normalization(dataset)
        note = (f"normalization: per-channel mean and std of {count} training images sampled across the table "
                "(the stream pipeline makes no pass over the whole table)")
    pa.default_memory_pool().release_unused()  # the sample's row groups
    return StreamingParquet(files, groups, labels, is_train, num_classes, class_names, mean, std, shape, image_size,
                            notes=(note,))


def sample_rows(dataset: StreamingParquet) -> torch.Tensor:
    """The training rows the normalization is measured on: up to ``SAMPLE_ROWS`` evenly spaced in each
    of up to ``SAMPLE_GROUPS`` row groups evenly spaced over the table (no randomness: the same for every seed)."""
    counts = dataset.train_counts
    with_rows = [group for group, count in enumerate(counts) if count]
    chosen = [with_rows[int(i)] for i in torch.linspace(0, len(with_rows) - 1, min(SAMPLE_GROUPS, len(with_rows)))]
    starts = torch.tensor([0] + counts).cumsum(0)
    picks = [starts[g] + torch.linspace(0, counts[g] - 1, min(SAMPLE_ROWS, counts[g])).long() for g in dict.fromkeys(chosen)]
    return dataset.train_rows[torch.cat(picks)]


def sample_normalization(dataset: StreamingParquet) -> tuple[list[float], list[float], tuple[int, ...], int]:
    """Per-channel mean and std of the sampled training images (``sample_rows``), their shape, their number."""
    images, good = decode_images(dataset.encoded_rows(sample_rows(dataset), OrderedDict(), 1), dataset.image_size)
    if not good:
        raise CohortError(f"none of the {len(sample_rows(dataset))} images sampled for the normalization decodes",
                          "data.root")
    # The rows that decode: a bad row stops the run when a batch reads it.
    mean, std = channel_statistics(images)
    return mean, [max(value, 1e-6) for value in std], tuple(images.shape[1:]), len(good)


def _first_shape(dataset: StreamingParquet) -> tuple[int, ...]:
    """The shape of the first sampled training image that decodes."""
    for blob in dataset.encoded_rows(sample_rows(dataset), OrderedDict(), 1):
        images, good = decode_images([blob], dataset.image_size)
        if good:
            return tuple(images.shape[1:])
    raise CohortError("none of the images sampled for their size decodes", "data.root")


def _floats(text: bytes) -> list[float]:
    return [float(value) for value in text.decode().split(",")]
