"""scikit-learn's 8x8 handwritten digits: small enough for tests and examples."""
from __future__ import annotations

import torch

from cohort.datasets.base import CohortDataset, TensorSplits
from cohort.datasets.registry import register_dataset


@register_dataset("digits", refusal="digits are embedded in scikit-learn: they take no root or download")
def load_digits() -> CohortDataset:
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
    preprocessing = {"source": "scikit-learn's load_digits images: 8x8 grayscale, pixel values 0-16",
                     "formula": "(pixels - mean) / std", "mean": [float(mean)], "std": [float(std)]}
    return TensorSplits("digits", ((train_x - mean) / std, labels[train_idx]),
                        ((test_x - mean) / std, labels[test_idx]), num_classes=10, preprocessing=preprocessing)
