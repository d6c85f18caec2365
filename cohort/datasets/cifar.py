"""CIFAR-10 and CIFAR-100 through torchvision, downloaded on request."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cohort.config.errors import CohortError
from cohort.datasets.augment import ImageArrays
from cohort.datasets.base import CohortDataset, DatasetInfo, need_root
from cohort.datasets.registry import register_dataset

CIFAR = {
    # name: (torchvision class, classes, mean, std): the normalization constants of the KD literature
    "cifar10": ("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def preview_cifar(dataset: str, root: str | None = None, download: bool = False) -> DatasetInfo | None:
    """The sizes of a CIFAR set torchvision has yet to download (None when it is there to load)."""
    if not download or root is None or (Path(root).expanduser() / FOLDERS[dataset]).is_dir():
        return None
    _, num_classes, _, _ = CIFAR[dataset]
    per_class = 50_000 // num_classes
    return DatasetInfo(dataset, num_classes, 3, 50_000, 10_000, (per_class,) * num_classes, input_size=(3, 32, 32),
                       memory_bytes=60_000 * (3 * 32 * 32 + 8),  # uint8 images, int64 labels: as load_cifar holds them
                       notes=(f"{dataset} is not in {root!r} yet: torchvision downloads it when the run starts",))


def load_cifar(dataset: str, root: str | None = None, download: bool = False) -> CohortDataset:
    import torchvision.datasets
    from filelock import FileLock

    class_name, num_classes, mean, std = CIFAR[dataset]
    path = need_root(dataset, root, download, "a folder for torchvision's CIFAR files")
    if download:
        path.mkdir(parents=True, exist_ok=True)
    splits = []
    # Peers on one machine share the root: one downloads while the others wait.
    with FileLock(str(path / f".{dataset}.lock")) if download else contextlib.nullcontext():
        for train in (True, False):
            try:
                source = getattr(torchvision.datasets, class_name)(str(path), train=train, download=download)
            except RuntimeError as error:
                if "not found" in str(error).lower():
                    raise CohortError(f"no {class_name.replace('CIFAR', 'CIFAR-')} data in {str(path)!r}: set "
                                      "data.download: true (or --set data.download=true) to fetch it with torchvision",
                                      "data.root") from None
                raise CohortError(f"cannot read {class_name} from {str(path)!r}: {error}", "data.root") from None
            except OSError as error:
                raise CohortError(f"cannot download {class_name} into {str(path)!r}: {error}", "data.root") from None
            images = torch.from_numpy(source.data).permute(0, 3, 1, 2).contiguous()
            splits.append((images, torch.tensor(source.targets, dtype=torch.long)))
    return ImageArrays(dataset, splits[0], splits[1], num_classes, mean, std, tuple(source.classes))


register_dataset("cifar10", preview=preview_cifar)(load_cifar)
register_dataset("cifar100", preview=preview_cifar)(load_cifar)
