"""Image tables in parquet files: encoded images with their labels and splits."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cohort.config.errors import CohortError
from cohort.datasets.augment import ImageArrays, channel_statistics
from cohort.datasets.base import CohortDataset, DatasetInfo, need_root
from cohort.datasets.registry import register_dataset

PARQUET_COLUMNS = ("image", "label", "split")


def preview_parquet(root: str | None = None, image_size: int | None = None) -> DatasetInfo:
    """The table's sizes, classes and input shape from its labels, its splits and its first image
    that decodes: what ``--dry-run`` shows, without decoding the table (rows that do not decode
    are found, skipped and counted when the run loads it)."""
    import pyarrow as pa

    path = need_root("parquet", root, False, "a .parquet file or a folder of them, with columns image, label, split")
    files, class_names = table_files(path)
    table = pa.concat_tables([_read(file, ["label", "split"]) for file in files])
    labels, is_train = labels_and_splits(table)
    shape = None
    for file in files:  # the first image that decodes gives the input shape
        for batch in _image_batches(file):
            images, good = decode_images(batch.column("image").to_pylist(), image_size, stop_at_first=True)
            if good:
                shape = tuple(images.shape[1:])
                break
        if shape is not None:
            break
    if shape is None:
        raise CohortError(f"none of the {len(labels)} images in {str(path)!r} could be decoded", "data.root")
    num_classes = max(int(labels.max()) + 1, len(class_names))
    train_labels = labels[is_train]
    rows = len(labels)
    return DatasetInfo("parquet", num_classes, shape[0], len(train_labels), rows - len(train_labels),
                       tuple(torch.bincount(train_labels, minlength=num_classes).tolist()), class_names,
                       input_size=shape,
                       # as load_parquet holds them: uint8 images, int64 labels, the per-channel mean and std (float32)
                       memory_bytes=rows * (int(torch.Size(shape).numel()) + 8) + 2 * shape[0] * 4)


def _image_batches(file: Path, rows: int = 64):
    """The ``image`` column of ``file`` in record batches of ``rows``, read lazily."""
    import pyarrow.parquet as pq

    with reading(file):
        yield from pq.ParquetFile(file).iter_batches(batch_size=rows, columns=["image"])


@contextmanager
def reading(file: Path | str, where: str = ""):
    """Read ``file``'s data within: a parquet file whose data does not read, though its footer did (a
    damaged page, a file gone since), becomes one line naming the file, ``where`` in it, and pyarrow's reason."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowException) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CohortError(f"{Path(file).name}{where}: not readable ({reason})", "data.root") from None


@register_dataset("parquet", preview=preview_parquet)
def load_parquet(root: str | None = None, image_size: int | None = None) -> CohortDataset:
    """An image table: ``image`` (encoded bytes: JPEG, PNG, ...), ``label`` (int), ``split``
    (``train`` / ``test``). ``root`` is a ``.parquet`` file or a folder of them.

    Rows whose bytes do not decode are skipped, counted, and reported in the plan. Normalization
    uses the training split's per-channel mean and std; the classes' names come from the schema
    metadata key ``classes`` (comma-separated) when present.
    """
    path = need_root("parquet", root, False, "a .parquet file or a folder of them, with columns image, label, split")
    table, class_names = _read_tables(path)
    labels, train_rows = labels_and_splits(table)
    blobs = table.column("image").to_pylist()
    # Each split decoded into a tensor of its own: no copy of the whole decoded table to split it.
    splits, shape = {}, None
    for name, in_split in (("train", train_rows), ("test", ~train_rows)):
        rows = in_split.nonzero().flatten().tolist()
        images, good = decode_images([blobs[row] for row in rows], image_size, rows=rows, shape=shape)
        shape = shape or (tuple(images.shape[1:]) if good else None)
        splits[name] = images, good
    good = sorted(splits["train"][1] + splits["test"][1])
    if not good:
        raise CohortError(f"none of the {len(labels)} images in {str(path)!r} could be decoded", "data.root")
    notes = []
    skipped = len(labels) - len(good)
    if skipped:
        bad_rows = sorted(set(range(len(labels))) - set(good))
        notes.append(f"skipped {skipped} undecodable image(s) in {path.name} (rows {', '.join(map(str, bad_rows[:5]))}"
                     f"{', ...' if skipped > 5 else ''})")
    (train_images, train_good), (test_images, test_good) = splits["train"], splits["test"]
    if not train_good or not test_good:
        raise CohortError("the table needs rows of both splits, train and test", "data.root")
    num_classes = max(int(labels[good].max()) + 1, len(class_names))
    mean, std = channel_statistics(train_images)
    return ImageArrays("parquet", (train_images, labels[train_good]), (test_images, labels[test_good]),
                       num_classes, mean, [max(value, 1e-6) for value in std], class_names, notes)


def labels_and_splits(table: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``label`` column (int64) and whether each row is a training row, checked."""
    splits = [str(s) for s in table.column("split").to_pylist()]
    unknown = sorted(set(splits) - {"train", "test"})
    if unknown:
        raise CohortError(f"column split holds {unknown[:3]}; expected 'train' and 'test'", "data.root")
    labels = torch.tensor(table.column("label").to_numpy(zero_copy_only=False).astype("int64"))
    if len(labels) and int(labels.min()) < 0:
        raise CohortError("column label holds negative values", "data.root")
    return labels, torch.tensor([split == "train" for split in splits], dtype=torch.bool)


def _read_tables(root: Path) -> tuple[Any, tuple[str, ...]]:
    """The image columns of every ``.parquet`` file at ``root``, and the classes' names if a file has them."""
    import pyarrow as pa

    files, class_names = table_files(root)
    return pa.concat_tables([_read(file, list(PARQUET_COLUMNS)) for file in files]), class_names


def _read(file: Path, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    with reading(file):
        return pq.read_table(file, columns=columns)


def table_files(root: Path) -> tuple[list[Path], tuple[str, ...]]:
    """The ``.parquet`` files at ``root``, each checked to hold an image table, and the classes' names if a file has them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files:
        raise CohortError(f"no .parquet files in {str(root)!r}", "data.root")
    class_names = ()
    for file in files:
        try:
            schema = pq.read_schema(file)
        except (OSError, pa.ArrowInvalid) as error:
            raise CohortError(f"{file.name}: not a readable parquet file ({error})", "data.root") from None
        missing = [column for column in PARQUET_COLUMNS if column not in schema.names]
        if missing:
            raise CohortError(f"{file.name}: missing column(s) {', '.join(missing)} (an image table needs "
                              f"{', '.join(PARQUET_COLUMNS)})", "data.root")
        if schema.metadata and b"classes" in schema.metadata:
            class_names = tuple(schema.metadata[b"classes"].decode().split(","))
    return files, class_names


def decode_images(blobs: list, image_size: int | None, stop_at_first: bool = False, rows: list[int] | None = None,
                  shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decode encoded images to RGB uint8 ``[N, 3, H, W]``; return them and the rows that decoded
    (only the first that decodes with ``stop_at_first``). ``rows``: the table's rows of ``blobs``
    (default 0, 1, ...), named in errors and returned; ``shape``: the ``[3, H, W]`` every image must
    have (default: the first decoded image's). Each image goes straight into one tensor allocated
    at that shape: no second copy of the decoded images."""
    import warnings

    import torchvision.io
    from torchvision.transforms.functional import resize

    images, good = None, []
    for index, blob in enumerate(blobs):
        row = index if rows is None else rows[index]
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 announces a move of its decoders to torchcodec; they still work and
                # are several times faster than PIL here.
                warnings.simplefilter("ignore", DeprecationWarning)
                image = torchvision.io.decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                                                    mode=torchvision.io.ImageReadMode.RGB)
        except (RuntimeError, TypeError, ValueError):
            continue
        if image_size is not None:
            image = resize(image, [image_size, image_size], antialias=True)
        if shape is None:
            shape = tuple(image.shape)
        if images is None and tuple(image.shape) == shape:
            images = torch.empty((1 if stop_at_first else len(blobs) - index, *shape), dtype=torch.uint8)
        elif tuple(image.shape) != shape:
            raise CohortError(f"row {row}: image of size {tuple(image.shape[1:])}, earlier ones are "
                              f"{tuple(shape[1:])} (set data.image_size to resize them all)", "data.root")
        images[len(good)] = image
        good.append(row)
        if stop_at_first:
            break
    if images is None:
        return torch.empty(0), good
    return (images if len(good) == len(images) else images[:len(good)].clone()), good
