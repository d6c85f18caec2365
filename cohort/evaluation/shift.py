"""Shifted test sets in the style of CIFAR-10-C: the run's own test images, corrupted.

The 15 common corruptions of Hendrycks & Dietterich (2019) at severities 1-5, generated with the
``imagecorruptions`` package of ``imagecorruptions-imaug`` (the maintained fork that runs on
numpy 2 and current scikit-image; the ``shift`` extra). Each image's corruption draws from a seed
derived from ``(seed, corruption, image index)``: the same images come out every time,
however the images are split into calls. The corrupted images are cached on disk.

The library refuses images smaller than 32x32; so does this module (digits are 8x8).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from cohort.config.errors import CohortError, did_you_mean
from cohort.datasets.base import Batch, CohortDataset, DatasetInfo

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",  # noise
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",  # blur
    "snow", "frost", "fog", "brightness",  # weather
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",  # digital
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # imagecorruptions refuses smaller images
LIBRARY = "imagecorruptions-imaug"  # the distribution that provides the ``imagecorruptions`` module
_TAKES_SEED = ("impulse_noise", "glass_blur")  # draw from their own generators, seeded by argument
# Each dataset's clean test split and its fingerprint, computed once: an evaluation asks for many
# settings of one dataset, and an image folder's test split is read from its files.
_CLEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- names and severities


def parse_corruptions(text: str, where: str = "--shift") -> list[str]:
    """``all`` or comma-separated corruption names, in the order given, each once."""
    if text.strip() == "all":
        return list(CORRUPTIONS)
    chosen: list[str] = []
    for name in (name.strip() for name in text.split(",")):
        check_corruption(name, where)
        if name not in chosen:
            chosen.append(name)
    return chosen


def check_corruption(name: str, where: str | None = "--shift") -> None:
    """One line naming the known corruptions when ``name`` is not one of them."""
    if name not in CORRUPTIONS:
        shown = repr(name) if name else "an empty name"
        raise CohortError(f"unknown corruption {shown}{did_you_mean(name, CORRUPTIONS)}; known: all, "
                          f"{', '.join(CORRUPTIONS)}", where)


def check_severity(severity: int, where: str | None = "--severity") -> None:
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise CohortError(f"{severity!r}: severities go from 1 to 5", where)


def parse_severities(text: str, where: str = "--severity") -> list[int]:
    """``3``, ``1-5``, ``1,3`` (or a mix, ``1-2,5``): ascending, each once."""
    chosen: set[int] = set()
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise CohortError(f"{item.strip()!r} is not a severity: give 3, 1-5 or 1,3 (severities 1 to 5)",
                              where) from None
        if not (SEVERITIES[0] <= first <= last <= SEVERITIES[-1]):
            raise CohortError(f"{item.strip()!r}: severities go from 1 to 5", where)
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def corruptions_for(info: DatasetInfo) -> tuple[str, ...]:
    """The corruptions a dataset's images can take: all 15 for images of at least 32x32 pixels with
    one or three channels, none otherwise (see ``shift_refusal``)."""
    return () if shift_refusal(info) else CORRUPTIONS


def shift_refusal(info: DatasetInfo) -> str | None:
    """Why a dataset's test split cannot be corrupted (one line), or None."""
    shape = tuple(info.input_size)
    if len(shape) != 3:
        return f"shifted data needs images; {info.name} inputs have shape {shape}"
    channels, height, width = shape
    if channels not in (1, 3) or height < MIN_SIDE or width < MIN_SIDE:
        return (f"shifted data needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels with 1 or 3 channels; "
                f"{info.name} images are {channels}x{height}x{width} (channels x height x width)")
    return None


# --------------------------------------------------------------------------- corrupting images


def image_seed(seed: int, corruption: str, index: int) -> int:
    """The seed of one image's corruption (fits numpy's legacy ``np.random.seed``). The severity is
    not part of it: an image draws the same noise, frost picture, ... at every severity, so that the
    severities differ by the corruption's strength alone."""
    digest = hashlib.blake2b(f"{seed}:{corruption}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def corrupt_images(images: torch.Tensor, corruption: str, severity: int, seed: int, start: int = 0) -> torch.Tensor:
    """``images`` (uint8 ``[N, C, H, W]``, C = 1 or 3) corrupted: uint8 of the same shape.

    Image ``i`` is corrupted with the seed ``image_seed(seed, corruption, start + i)``:
    corrupting a batch that starts at image ``start`` of a set gives the same bytes as corrupting
    the whole set. numpy's global generator, which most corruptions draw from, is restored after.
    One-channel images are corrupted as gray RGB images and turned back into luma (ITU-R 601).
    """
    check_corruption(corruption, None)
    check_severity(severity, None)
    corrupt = _library()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] and min(images.shape[2:]) < MIN_SIDE:
        raise CohortError(f"shifted data needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, not "
                          f"{images.shape[2]}x{images.shape[3]}")
    gray = images.shape[1] == 1
    pixels = images.permute(0, 2, 3, 1).numpy()  # [N, H, W, C], as the library takes them
    out = np.empty_like(pixels)
    state = np.random.get_state()
    try:
        for i, image in enumerate(pixels):
            image_rng = image_seed(seed, corruption, start + i)
            np.random.seed(image_rng)
            extra = {"seed": image_rng} if corruption in _TAKES_SEED else {}
            result = corrupt(image[..., 0] if gray else image, severity=severity, corruption_name=corruption, **extra)
            if gray:
                luma = result.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
                result = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
            out[i] = result
    finally:
        np.random.set_state(state)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _library():
    # The original imagecorruptions (1.1.2) installs the same module but fails on numpy 2.
    if library_version() == "unknown":
        raise CohortError(f"shifted data needs the {LIBRARY} package: pip install 'cohort[shift]'")
    from imagecorruptions import corrupt

    return corrupt


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY)
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- shifted datasets


class ShiftedTest(CohortDataset):
    """A dataset whose test split is replaced by corrupted images (the same labels, the same
    normalization); its training split is the wrapped dataset's, untouched."""

    def __init__(self, inner: CohortDataset, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, corruption: str, severity: int, seed: int):
        self.inner = inner
        self.test_images, self.test_labels = images, labels
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.corruption, self.severity, self.seed = corruption, severity, seed
        note = f"test split: {corruption} at severity {severity} (seed {seed})"
        self.info = dataclasses.replace(inner.info, notes=inner.info.notes + (note,))

    @property
    def train_targets(self) -> torch.Tensor:
        return self.inner.train_targets

    def make_batch(self, indices: torch.Tensor, train: bool, seed: int) -> Batch:
        if train:
            return self.inner.make_batch(indices, train, seed)
        images = self.test_images[indices].float().div_(255)
        return (images - self.mean) / self.std, self.test_labels[indices]


def shifted_dataset(dataset: CohortDataset, corruption: str, severity: int, seed: int,
                    cache_dir: str | Path | None = None) -> ShiftedTest:
    """``dataset`` with its test split corrupted: ``corruption`` at ``severity``, seeded by ``seed``.

    Works on the image datasets (CIFAR, parquet tables, image folders: for an image folder, the
    test images as the network sees them, resized and center-cropped) and on wrappers of them
    that keep the test split (``LongTailed``, a ``ShiftedTest``: the clean images are corrupted).
    The corrupted images are cached in ``cache_dir`` (default: ``default_cache_dir()``).
    """
    refusal = shift_refusal(dataset.info)
    if refusal:
        raise CohortError(refusal)
    check_corruption(corruption, None)
    check_severity(severity, None)
    clean, labels, mean, std = clean_test_split(dataset)
    path = cache_path(dataset.info.name, clean, corruption, severity, seed, cache_dir)
    images = _load(path, clean.shape)
    if images is None:
        images = corrupt_images(clean, corruption, severity, seed)
        _save(images, path)
    return ShiftedTest(dataset, images, labels, mean, std, corruption, severity, seed)


def clean_test_split(dataset: CohortDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test split as uint8 ``[N, C, H, W]`` images, their labels, and the normalization's
    per-channel mean and std (the network's inputs are ``(images / 255 - mean) / std``)."""
    from cohort.datasets.augment import ImageArrays
    from cohort.datasets.folder import ImageFolderSplits
    from cohort.datasets.streaming import StreamingParquet

    base = dataset
    while hasattr(base, "inner"):  # wrappers (long tail, shift) keep their inner dataset's test split
        base = base.inner
    if base.info.test_size != dataset.info.test_size:
        raise CohortError(f"{dataset.info.name}: the test split is not the wrapped dataset's; cannot corrupt it")
    if base in _CLEAN:
        return _CLEAN[base]
    if isinstance(base, ImageArrays):
        split = base.test_images, base.test_labels, base.mean.flatten(), base.std.flatten()
    elif isinstance(base, ImageFolderSplits):
        split = _folder_test_split(base)
    elif isinstance(base, StreamingParquet):  # decoded here, for the evaluation: training never held it
        images = base.read_images(base.test_rows, cache=OrderedDict(), capacity=2)
        split = images, base.labels[base.test_rows], base.mean.flatten(), base.std.flatten()
    else:
        raise CohortError(f"shifted data works on image datasets (cifar10, cifar100, parquet, imagefolder), "
                          f"not on {dataset.info.name}")
    _CLEAN[base] = split
    return split


def _folder_test_split(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from torchvision import transforms

    *geometry, to_tensor, normalize = dataset.test_transform.transforms
    assert isinstance(to_tensor, transforms.ToTensor) and isinstance(normalize, transforms.Normalize)
    resize = transforms.Compose([*geometry, transforms.PILToTensor()])
    images, labels = [], []
    for path, label in dataset.test.samples:
        images.append(resize(dataset.test.loader(path)))
        labels.append(label)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.long),
            torch.tensor(normalize.mean, dtype=torch.float32), torch.tensor(normalize.std, dtype=torch.float32))


# --------------------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """``$COHORT_CACHE/shift`` when ``COHORT_CACHE`` is set, else ``~/.cache/cohort/shift``."""
    root = os.environ.get("COHORT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cohort") / "shift"


def fingerprint(images: torch.Tensor) -> str:
    """A digest of a set of uint8 images (their shape and bytes)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def plain_name(name: str) -> str:
    """A dataset's name as a file name or an MLflow key part: letters, digits, ``-_.``; ``_`` for the rest."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cache_path(name: str, clean: torch.Tensor, corruption: str, severity: int, seed: int,
               cache_dir: str | Path | None = None) -> Path:
    """Where the corrupted images of one setting are cached: by dataset, corruption, severity,
    seed, the clean images' fingerprint and the corruption library's version."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / (f"{plain_name(name)}-{fingerprint(clean)}-{corruption}-s{severity}-seed{seed}"
                     f"-ic{library_version()}.pt")


def _load(path: Path, shape: torch.Size) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        images = torch.load(path, weights_only=True)
    except Exception:  # a damaged file (a full disk, a foreign write): generate again
        return None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape != shape:
        return None
    return images


def _save(images: torch.Tensor, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, renamed over ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(images, file)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise CohortError(f"cannot write the shifted-data cache {str(path.parent)!r}: {error.strerror or error} "
                          "(set COHORT_CACHE to another folder)") from None
