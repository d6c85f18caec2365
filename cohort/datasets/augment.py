"""Small images in memory with the CIFAR training augmentation (cifar10, cifar100, parquet)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cohort.datasets.base import Batch, CohortDataset, DatasetInfo, class_counts
from cohort.datasets.shared import held_bytes


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
                                len(self.test_labels), class_counts(self.train_labels, num_classes),
                                tuple(class_names), tuple(notes), tuple(self.train_images.shape[1:]),
                                memory_bytes=held_bytes(vars(self)))

    @property
    def train_targets(self) -> torch.Tensor:
        return self.train_labels

    def preprocessing(self) -> dict:
        return {"source": f"{self.info.input_size[1]}x{self.info.input_size[2]} images, uint8 pixels, channels first",
                "formula": "(pixels / 255 - mean) / std, per channel",
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        if not train:
            return self._normalize(self.test_images[indices]), self.test_labels[indices]
        return self._normalize(self._augment(self.train_images[indices], seed)), self.train_labels[indices]

    def plain_train_batch(self, indices: torch.Tensor) -> Batch:
        return self._normalize(self.train_images[indices]), self.train_labels[indices]

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        return cifar_augment(images, seed, self.padding)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


def cifar_augment(images: torch.Tensor, seed: int, padding: int = 4) -> torch.Tensor:
    """The CIFAR training augmentation of uint8 ``[N, C, H, W]`` images, seeded by ``seed`` (a batch's
    seed): a random crop of each image padded by ``padding`` pixels with zeros, and a horizontal flip."""
    generator = torch.Generator().manual_seed(seed)
    count, _, height, width = images.shape
    pad = padding
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).tolist()
    flips = (torch.rand(count, generator=generator) < 0.5).tolist()
    crops = []
    for image, (top, left), flip in zip(padded, offsets, flips):
        crop = image[:, top:top + height, left:left + width]
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)


def channel_statistics(images: torch.Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (with Bessel's correction, as ``torch.std``) of uint8
    images ``[N, C, H, W]`` as ``pixels / 255``: what ``normalize`` takes. Exact, from integer sums
    over ``chunk`` images at a time, so no float copy of the images is made (a float32 copy of a
    table's training split is four times its size, and torch's ``std`` makes more)."""
    count = images.shape[0] * images.shape[2] * images.shape[3]
    totals = [0] * images.shape[1]
    squares = [0] * images.shape[1]
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.int64)
        totals = [a + b for a, b in zip(totals, part.sum(dim=(0, 2, 3)).tolist(), strict=True)]
        squares = [a + b for a, b in zip(squares, part.square_().sum(dim=(0, 2, 3)).tolist(), strict=True)]
    mean = [total / count / 255 for total in totals]
    # Python's integers keep the sums exact whatever their size; the one division is the last step.
    spread = [(square * count - total * total) / (count * (count - 1)) if count > 1 else float("nan")
              for total, square in zip(totals, squares, strict=True)]
    return mean, [value ** 0.5 / 255 for value in spread]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images as floats, ``(pixels / 255 - mean) / std`` per channel (``mean``, ``std``: ``[1, C, 1, 1]``)."""
    return (images.float().div_(255) - mean) / std
