"""Datasets, and batches that are identical on every peer.

Every peer builds the same dataset and draws its batches in an order, and with an augmentation,
that are functions of ``(seed, epoch, batch number)`` alone: all peers see the same samples, the
same crops and the same flips without any coordination, whatever ``num_workers`` is (and without
sharding: peers are different networks, not replicas).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from cohort.errors import CohortError

if TYPE_CHECKING:
    from cohort.topology import DataConfig

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


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The augmentation seed of one training batch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class CohortDataset:
    """A train and a test split, served as batches.

    Subclasses implement ``make_batch(indices, train, seed)``, a pure function of its arguments,
    so that batches can be built in DataLoader worker processes in any order.
    """

    info: DatasetInfo

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        raise NotImplementedError

    @property
    def train_targets(self) -> torch.Tensor:
        """Every training sample's label, in index order."""
        raise NotImplementedError

    def train_batches(self, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                      shards: int = 1) -> Iterator[Batch]:
        """The epoch's whole batches (``shards``: how many replicas will split each of them)."""
        order = epoch_order(self.info.train_size, seed, epoch)
        plan = [(index, True, batch_seed(seed, epoch, number))
                for number, index in enumerate(batch_indices(order, batch_size, shards))]
        return self._serve(plan, num_workers)

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


# --------------------------------------------------------------------------- tensors in memory


class TensorSplits(CohortDataset):
    """Float inputs ``[N, C, H, W]`` held in memory, without augmentation (digits)."""

    def __init__(self, name: str, train: Batch, test: Batch, num_classes: int):
        self.train_x, self.train_y = train
        self.test_x, self.test_y = test
        self.info = DatasetInfo(name, num_classes, self.train_x.shape[1], len(self.train_y), len(self.test_y),
                                _counts(self.train_y, num_classes), input_size=tuple(self.train_x.shape[1:]))

    @property
    def train_targets(self) -> torch.Tensor:
        return self.train_y

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        if train:
            return self.train_x[indices], self.train_y[indices]
        return self.test_x[indices], self.test_y[indices]


class ImageArrays(CohortDataset):
    """Small images as uint8 ``[N, 3, H, W]`` in memory, with the CIFAR training augmentation:
    a random crop of the image padded by 4 pixels with zeros, and a horizontal flip."""

    def __init__(self, name: str, train: Batch, test: Batch, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], class_names: Sequence[str] = (), notes: Sequence[str] = (), padding: int = 4):
        self.train_images, self.train_labels = train
        self.test_images, self.test_labels = test
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.padding = padding
        self.info = DatasetInfo(name, num_classes, self.train_images.shape[1], len(self.train_labels),
                                len(self.test_labels), _counts(self.train_labels, num_classes), tuple(class_names),
                                tuple(notes), tuple(self.train_images.shape[1:]))

    @property
    def train_targets(self) -> torch.Tensor:
        return self.train_labels

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        if not train:
            return self._normalize(self.test_images[indices]), self.test_labels[indices]
        return self._normalize(self._augment(self.train_images[indices], seed)), self.train_labels[indices]

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        count, _, height, width = images.shape
        pad = self.padding
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).tolist()
        flips = (torch.rand(count, generator=generator) < 0.5).tolist()
        crops = []
        for image, (top, left), flip in zip(padded, offsets, flips):
            crop = image[:, top:top + height, left:left + width]
            crops.append(crop.flip(-1) if flip else crop)
        return torch.stack(crops)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean) / self.std


# --------------------------------------------------------------------------- long-tailed training sets


LONG_TAIL_SEED = 0  # which images a long-tailed set keeps is the same for every run


def long_tail_counts(n_max: int, num_classes: int, imbalance: float, profile: str) -> list[int]:
    """Images to keep per class (class 0 is the head), as in LDAM-DRW.

    ``exponential``: ``int(n_max · imbalance^(−i/(C−1)))``; ``step``: the first half of the
    classes keep ``n_max``, the others ``int(n_max / imbalance)``.
    """
    if profile == "exponential":
        return [int(n_max * imbalance ** (-i / max(num_classes - 1, 1))) for i in range(num_classes)]
    return [n_max if i < num_classes // 2 else int(n_max / imbalance) for i in range(num_classes)]


class LongTailed(CohortDataset):
    """A dataset whose training split keeps ``long_tail_counts`` images per class; the test split
    is untouched."""

    def __init__(self, inner: CohortDataset, imbalance: float, profile: str):
        self.inner = inner
        targets = inner.train_targets
        info = inner.info
        wanted = long_tail_counts(max(info.train_class_counts), info.num_classes, imbalance, profile)
        generator = torch.Generator().manual_seed(LONG_TAIL_SEED)
        kept = []
        for cls, count in enumerate(wanted):
            members = torch.nonzero(targets == cls).flatten()
            kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
        self.keep = torch.cat(kept).sort().values
        counts = _counts(targets[self.keep], info.num_classes)
        note = f"long-tailed training set ({profile}, imbalance {imbalance:g}): {len(self.keep)} images"
        self.info = DatasetInfo(info.name, info.num_classes, info.in_channels, len(self.keep), info.test_size,
                                counts, info.class_names, info.notes + (note,), info.input_size)

    @property
    def train_targets(self) -> torch.Tensor:
        return self.inner.train_targets[self.keep]

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        return self.inner.make_batch(self.keep[indices] if train else indices, train, seed)


def _counts(labels: torch.Tensor, num_classes: int) -> tuple[int, ...]:
    return tuple(int(c) for c in torch.bincount(labels, minlength=num_classes))


# --------------------------------------------------------------------------- the registry


DATASETS: dict[str, Callable[["DataConfig"], CohortDataset]] = {}


def register_dataset(name: str):
    def decorator(builder: Callable[["DataConfig"], CohortDataset]):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = builder
        return builder

    return decorator


def load_dataset(config: "DataConfig") -> CohortDataset:
    if config.dataset not in DATASETS:
        raise CohortError(f"unknown dataset {config.dataset!r} (known: {', '.join(sorted(DATASETS))})", "data.dataset")
    dataset = DATASETS[config.dataset](config)
    if config.long_tail is not None:
        dataset = LongTailed(dataset, config.long_tail.imbalance, config.long_tail.profile)
    return dataset


def describe_dataset(config: "DataConfig") -> DatasetInfo:
    """The dataset's sizes and classes, without downloading anything (for ``--dry-run``)."""
    if config.dataset in CIFAR and config.download and config.root is not None and not _cifar_present(config):
        _, num_classes, _, _ = CIFAR[config.dataset]
        per_class = 50_000 // num_classes
        counts = [per_class] * num_classes
        if config.long_tail is not None:
            counts = long_tail_counts(per_class, num_classes, config.long_tail.imbalance, config.long_tail.profile)
        return DatasetInfo(config.dataset, num_classes, 3, sum(counts), 10_000, tuple(counts), input_size=(3, 32, 32),
                           notes=(f"{config.dataset} is not in {config.root!r} yet: torchvision downloads it "
                                  "when the run starts",))
    return load_dataset(config).info


def _need_root(config: "DataConfig", what: str) -> Path:
    if config.root is None:
        raise CohortError(f"dataset {config.dataset!r} needs a root: {what}", "data.root")
    root = Path(config.root).expanduser()
    if not root.exists() and not config.download:
        raise CohortError(f"{str(root)!r} does not exist ({what})", "data.root")
    return root


# --------------------------------------------------------------------------- digits


@register_dataset("digits")
def load_digits(config: "DataConfig") -> CohortDataset:
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
    return TensorSplits("digits", ((train_x - mean) / std, labels[train_idx]),
                        ((test_x - mean) / std, labels[test_idx]), num_classes=10)


# --------------------------------------------------------------------------- CIFAR through torchvision


CIFAR = {
    # name: (torchvision class, classes, mean, std): the normalization constants of the KD literature
    "cifar10": ("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar_present(config: "DataConfig") -> bool:
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[config.dataset]
    return (Path(config.root).expanduser() / folder).is_dir()


def _load_cifar(config: "DataConfig") -> CohortDataset:
    import torchvision.datasets
    from filelock import FileLock

    class_name, num_classes, mean, std = CIFAR[config.dataset]
    root = _need_root(config, "a folder for torchvision's CIFAR files")
    if config.download:
        root.mkdir(parents=True, exist_ok=True)
    splits = []
    # Peers on one machine share the root: one downloads while the others wait.
    with FileLock(str(root / f".{config.dataset}.lock")) if config.download else _no_lock():
        for train in (True, False):
            try:
                source = getattr(torchvision.datasets, class_name)(str(root), train=train, download=config.download)
            except RuntimeError as error:
                if "not found" in str(error).lower():
                    raise CohortError(f"no {class_name.replace('CIFAR', 'CIFAR-')} data in {str(root)!r}: set "
                                      "data.download: true (or --set data.download=true) to fetch it with torchvision",
                                      "data.root") from None
                raise CohortError(f"cannot read {class_name} from {str(root)!r}: {error}", "data.root") from None
            except OSError as error:
                raise CohortError(f"cannot download {class_name} into {str(root)!r}: {error}", "data.root") from None
            images = torch.from_numpy(source.data).permute(0, 3, 1, 2).contiguous()
            splits.append((images, torch.tensor(source.targets, dtype=torch.long)))
    return ImageArrays(config.dataset, splits[0], splits[1], num_classes, mean, std, tuple(source.classes))


class _no_lock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


register_dataset("cifar10")(_load_cifar)
register_dataset("cifar100")(_load_cifar)


# --------------------------------------------------------------------------- parquet image tables


PARQUET_COLUMNS = ("image", "label", "split")


@register_dataset("parquet")
def load_parquet(config: "DataConfig") -> CohortDataset:
    """An image table: ``image`` (encoded bytes: JPEG, PNG, ...), ``label`` (int), ``split``
    (``train`` / ``test``). ``root`` is a ``.parquet`` file or a folder of them.

    Rows whose bytes do not decode are skipped, counted, and reported in the plan. Normalization
    uses the training split's per-channel mean and std; the classes' names come from the schema
    metadata key ``classes`` (comma-separated) when present.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _need_root(config, "a .parquet file or a folder of them, with columns image, label, split")
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files:
        raise CohortError(f"no .parquet files in {str(root)!r}", "data.root")
    tables, class_names = [], ()
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
        tables.append(pq.read_table(file, columns=list(PARQUET_COLUMNS)))
    table = pa.concat_tables(tables)
    splits = [str(s) for s in table.column("split").to_pylist()]
    unknown = sorted(set(splits) - {"train", "test"})
    if unknown:
        raise CohortError(f"column split holds {unknown[:3]}; expected 'train' and 'test'", "data.root")
    labels = torch.tensor(table.column("label").to_numpy(zero_copy_only=False).astype("int64"))
    if len(labels) and int(labels.min()) < 0:
        raise CohortError("column label holds negative values", "data.root")
    images, good = _decode_all(table.column("image").to_pylist(), config.image_size)
    if not good:
        raise CohortError(f"none of the {len(labels)} images in {str(root)!r} could be decoded", "data.root")
    notes = []
    skipped = len(labels) - len(good)
    if skipped:
        bad_rows = sorted(set(range(len(labels))) - set(good))
        notes.append(f"skipped {skipped} undecodable image(s) in {root.name} (rows {', '.join(map(str, bad_rows[:5]))}"
                     f"{', ...' if skipped > 5 else ''})")
    kept = torch.tensor(good)
    labels = labels[kept]
    is_train = torch.tensor([splits[i] == "train" for i in good])
    num_classes = max(int(labels.max()) + 1, len(class_names))
    train_images = images[is_train]
    if not len(train_images) or is_train.all():
        raise CohortError("the table needs rows of both splits, train and test", "data.root")
    pixels = train_images.float().div(255)
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    return ImageArrays("parquet", (train_images, labels[is_train]), (images[~is_train], labels[~is_train]),
                       num_classes, mean, std, class_names, notes)


def _decode_all(blobs: list, image_size: int | None) -> tuple[torch.Tensor, list[int]]:
    """Decode encoded images to RGB uint8 ``[N, 3, H, W]``; return them and the rows that decoded."""
    import warnings

    import torchvision.io
    from torchvision.transforms.functional import resize

    decoded, good, shape = [], [], None
    for row, blob in enumerate(blobs):
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
            shape = image.shape
        elif image.shape != shape:
            raise CohortError(f"row {row}: image of size {tuple(image.shape[1:])}, earlier ones are "
                              f"{tuple(shape[1:])} (set data.image_size to resize them all)", "data.root")
        decoded.append(image)
        good.append(row)
    return (torch.stack(decoded) if decoded else torch.empty(0)), good


# --------------------------------------------------------------------------- image folders


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderSplits(CohortDataset):
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (TinyImageNet, ImageNet layouts).

    Training: RandomResizedCrop(image_size) and a horizontal flip; test: Resize(image_size / 0.875)
    and CenterCrop(image_size). Each training image's augmentation is seeded by its batch's seed
    and its position, so it is identical on every peer and in any DataLoader worker.
    """

    def __init__(self, root: Path, image_size: int):
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        self.root = root
        try:
            self.train = ImageFolder(str(root / "train"))
            self.test = ImageFolder(str(root / "val"))
        except (FileNotFoundError, OSError) as error:
            raise CohortError(f"not an image folder ({error})", "data.root") from None
        if self.train.classes != self.test.classes:
            only_train = sorted(set(self.train.classes) - set(self.test.classes))
            only_val = sorted(set(self.test.classes) - set(self.train.classes))
            raise CohortError(f"train and val classes differ (only in train: {only_train[:3]}, only in val: "
                              f"{only_val[:3]})", "data.root")
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
        self.test_transform = transforms.Compose([
            transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size), transforms.ToTensor(),
            normalize])
        targets = torch.tensor(self.train.targets, dtype=torch.long)
        self.info = DatasetInfo("imagefolder", len(self.train.classes), 3, len(self.train), len(self.test),
                                _counts(targets, len(self.train.classes)), tuple(self.train.classes),
                                input_size=(3, image_size, image_size))

    @property
    def train_targets(self) -> torch.Tensor:
        return torch.tensor(self.train.targets, dtype=torch.long)

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        source, transform = (self.train, self.train_transform) if train else (self.test, self.test_transform)
        images, labels = [], []
        for position, index in enumerate(indices.tolist()):
            path, label = source.samples[index]
            image = source.loader(path)
            if train:
                # torchvision's random transforms draw from the global generator: fork it.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + position)
                    images.append(transform(image))
            else:
                images.append(transform(image))
            labels.append(label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@register_dataset("imagefolder")
def load_imagefolder(config: "DataConfig") -> CohortDataset:
    root = _need_root(config, "a folder with train/<class>/ and val/<class>/ subfolders")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise CohortError(f"{str(root)!r} has no {split}/ folder (expected train/<class>/... and "
                              "val/<class>/...)", "data.root")
    return ImageFolderSplits(root, config.image_size or 224)
