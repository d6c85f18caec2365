"""Datasets: one file per dataset in this package, each registering its loader with
``@register_dataset`` (see ``registry``); every module here is imported with the package, so a new
dataset is one new file."""
import importlib
import pkgutil

from cohort.datasets.augment import ImageArrays
from cohort.datasets.base import (
    Batch,
    CohortDataset,
    DatasetInfo,
    TensorSplits,
    batch_indices,
    batch_seed,
    class_counts,
    epoch_order,
    need_root,
)
from cohort.datasets.long_tail import LongTailed, long_tail_counts
from cohort.datasets.registry import (
    DATASET_SETTINGS,
    DATASETS,
    DatasetSpec,
    dataset_identity,
    describe_dataset,
    load_dataset,
    refused_setting,
    register_dataset,
)
from cohort.datasets.sampling import check_sampler, class_balanced_batches

# The built-in datasets first, in the order messages list them; then any other file of the package.
from cohort.datasets import digits, cifar, parquet, folder  # noqa: E402,F401  isort: skip

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Batch", "CohortDataset", "DatasetInfo", "TensorSplits", "ImageArrays", "LongTailed", "DatasetSpec",
    "DATASETS", "DATASET_SETTINGS", "register_dataset", "load_dataset", "dataset_identity", "describe_dataset", "refused_setting",
    "batch_indices", "batch_seed", "epoch_order", "class_counts", "need_root", "long_tail_counts",
    "class_balanced_batches", "check_sampler",
]
