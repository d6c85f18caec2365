"""Image folders: ``root/train/<class>/*`` and ``root/val/<class>/*`` (TinyImageNet, ImageNet layouts)."""
from __future__ import annotations

from pathlib import Path

import torch

from cohort.config.errors import CohortError
from cohort.datasets.base import (
    Batch,
    CohortDataset,
    DatasetInfo,
    class_counts,
    need_root,
)
from cohort.datasets.registry import register_dataset

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
        self.image_size = image_size
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
                                class_counts(targets, len(self.train.classes)), tuple(self.train.classes),
                                input_size=(3, image_size, image_size), decodes_batches=True,
                                # Whatever size the files have: 224 (ImageNet's) unless data.image_size says otherwise.
                                notes=(f"every image resized and cropped to {image_size}x{image_size} "
                                       "(data.image_size)",))

    @property
    def train_targets(self) -> torch.Tensor:
        return torch.tensor(self.train.targets, dtype=torch.long)

    def preprocessing(self) -> dict:
        return {"source": "RGB images of any size",
                "resize": round(self.image_size / 0.875), "center_crop": self.image_size,
                "formula": "resize the shorter side, center crop, then (pixels / 255 - mean) / std, per channel",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        source, transform = (self.train, self.train_transform) if train else (self.test, self.test_transform)
        return self._load(source, transform, indices, train, seed)

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        return self._load(self.train, self.test_transform, indices, False, 0)

    @staticmethod
    def _load(source, transform, indices: torch.Tensor, train: bool, seed: int) -> Batch:
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
def load_imagefolder(root: str | None = None, image_size: int = 224) -> CohortDataset:
    path = need_root("imagefolder", root, False, "a folder with train/<class>/ and val/<class>/ subfolders")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise CohortError(f"{str(path)!r} has no {split}/ folder (expected train/<class>/... and "
                              "val/<class>/...)", "data.root")
    return ImageFolderSplits(path, image_size)
