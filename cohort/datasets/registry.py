"""A decorator registry of datasets, in the style of ``cohort.losses``.

A dataset is one file in ``cohort/datasets/`` with a loader registered by
``@register_dataset("name")``. The loader's signature is its schema: its parameters are the data
settings it takes (names of ``DATASET_SETTINGS``, each with a default, used when the topology leaves
the setting unset), and a parameter ``dataset`` receives the registered name (one loader can serve
several names). A topology that gives a dataset a setting its loader does not take is refused.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cohort.config.errors import CohortError, unknown
from cohort.datasets.base import CohortDataset, DatasetInfo
from cohort.datasets.long_tail import LongTailed, long_tail_counts, long_tail_note
from cohort.datasets.validation import ValidationSplit, split_info

# The data section's settings that depend on the dataset (fields of cohort.topology.DataConfig),
# each with its unset value, in the order they are checked.
DATASET_SETTINGS: dict[str, Any] = {"root": None, "download": False, "image_size": None}
# Where the data comes from: a dataset's `refusal` (why it takes neither) speaks for these.
SOURCE_SETTINGS = ("root", "download")
NAME_PARAMETER = "dataset"
_REFUSALS = {
    "root": "{dataset} takes no root",
    "download": "only {takers} can be downloaded, not {dataset}",
    "image_size": "only {takers} datasets are resized, not {dataset}",
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., CohortDataset]
    settings: dict[str, Any]  # setting -> the loader's default
    wants_name: bool
    refusal: str | None = None
    preview: Callable[..., DatasetInfo | None] | None = None

    def arguments(self, config: Any) -> dict[str, Any]:
        """The loader's keyword arguments for a topology's data section."""
        arguments = {}
        for setting, default in self.settings.items():
            value = getattr(config, setting)
            arguments[setting] = default if value == DATASET_SETTINGS[setting] else value
        if self.wants_name:
            arguments[NAME_PARAMETER] = self.name
        return arguments


DATASETS: dict[str, DatasetSpec] = {}
# Datasets that can be streamed (data.pipeline: stream): name -> the streaming loader, which takes the
# same settings as the dataset's own and returns a dataset with ``within(batch_size, memory_bound)``.
STREAMS: dict[str, Callable[..., Any]] = {}


def _settings_from_signature(name: str, loader: Callable[..., CohortDataset]) -> tuple[dict[str, Any], bool]:
    where = f"dataset {name!r} ({getattr(loader, '__qualname__', loader)})"
    settings, wants_name = {}, False
    for parameter in inspect.signature(loader).parameters.values():
        if parameter.name == NAME_PARAMETER:
            wants_name = True
        elif parameter.name not in DATASET_SETTINGS:
            raise ValueError(f"{where}: parameter {parameter.name!r} is not a data setting "
                             f"({', '.join(DATASET_SETTINGS)}) or {NAME_PARAMETER!r}")
        elif parameter.default is inspect.Parameter.empty:
            raise ValueError(f"{where}: setting {parameter.name!r} needs a default (used when it is unset)")
        else:
            settings[parameter.name] = parameter.default
    return settings, wants_name


def register_dataset(name: str, *, refusal: str | None = None,
                     preview: Callable[..., DatasetInfo | None] | None = None):
    """Register a loader under ``name``; the loader is returned unchanged.

    ``refusal``: the one-line reason given when the topology sets a source setting (root, download)
    the loader does not take. ``preview(**arguments)``: the dataset's ``DatasetInfo`` without
    loading it (for ``--dry-run``), or None to load it.
    """
    def decorator(loader: Callable[..., CohortDataset]) -> Callable[..., CohortDataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        settings, wants_name = _settings_from_signature(name, loader)
        DATASETS[name] = DatasetSpec(name, loader, settings, wants_name, refusal, preview)
        return loader

    return decorator


def register_stream(name: str):
    """Register the streaming loader of the dataset ``name`` (``data.pipeline: stream``); returned unchanged."""
    def decorator(loader: Callable[..., Any]) -> Callable[..., Any]:
        if name in STREAMS:
            raise ValueError(f"dataset {name!r} has two streaming loaders")
        STREAMS[name] = loader
        return loader

    return decorator


def streamed(config: Any) -> bool:
    """Whether the data section's dataset is streamed: ``data.pipeline: stream``, or ``auto`` with a
    ``data.memory_bound`` that the dataset held in memory (its preview's ``memory_bytes``) would exceed."""
    pipeline, bound = getattr(config, "pipeline", "auto"), getattr(config, "memory_bound", None)
    if pipeline == "stream":
        return True
    if pipeline != "auto" or bound is None or config.dataset not in STREAMS:
        return False
    spec = DATASETS[config.dataset]
    info = spec.preview(**spec.arguments(config)) if spec.preview is not None else None
    return info is not None and info.memory_bytes > bound


def refused_setting(dataset: str, values: dict[str, Any]) -> tuple[str, str] | None:
    """The first setting given a value (``values``: setting -> value) that ``dataset`` does not
    take, and the one-line reason; None when the dataset takes them all."""
    spec = DATASETS.get(dataset)
    if spec is None:
        return None
    for setting, unset in DATASET_SETTINGS.items():
        if values.get(setting, unset) == unset or setting in spec.settings:
            continue
        if spec.refusal and setting in SOURCE_SETTINGS:
            return setting, spec.refusal
        takers = [other.name for other in DATASETS.values() if setting in other.settings]
        return setting, _REFUSALS[setting].format(dataset=dataset, takers=_and(takers))
    return None


def _and(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def load_dataset(config: Any, seed: int = 0) -> CohortDataset:
    """The dataset of a topology's data section (``cohort.topology.DataConfig``); ``seed`` (the
    topology's) chooses the validation split's images."""
    if config.dataset not in DATASETS:
        raise CohortError(unknown("dataset", config.dataset, DATASETS), "data.dataset")
    spec = DATASETS[config.dataset]
    if streamed(config):  # the same long tail and validation split as in memory; no sampler (the topology refuses it)
        stream = STREAMS[config.dataset](**spec.arguments(config))
        if config.long_tail is not None:
            stream = stream.long_tailed(config.long_tail.imbalance, config.long_tail.profile)
        if getattr(config, "val_fraction", 0):
            stream = stream.holding_out(config.val_fraction, seed)
        return stream.within(config.batch_size, getattr(config, "memory_bound", None))
    dataset = spec.loader(**spec.arguments(config))
    if config.long_tail is not None:
        dataset = LongTailed(dataset, config.long_tail.imbalance, config.long_tail.profile)
    if getattr(config, "val_fraction", 0):
        dataset = ValidationSplit(dataset, config.val_fraction, seed)
    return dataset


def dataset_identity(config: Any, seed: int = 0) -> str:
    """What ``load_dataset(config, seed)`` depends on, as text: two topologies of one identity load
    the same data. The whole data section counts (a streamed table's batches follow the batch size);
    the seed only where it draws the validation split."""
    return json.dumps({"data": config.model_dump(mode="json"), "seed": seed if getattr(config, "val_fraction", 0) else None},
                      sort_keys=True)


def describe_dataset(config: Any) -> DatasetInfo:
    """The dataset's sizes and classes, without downloading anything (for ``--dry-run``)."""
    spec = DATASETS.get(config.dataset)
    if spec is not None and streamed(config):  # its layout and a sample: nothing held
        return load_dataset(config).info
    info = spec.preview(**spec.arguments(config)) if spec is not None and spec.preview is not None else None
    if info is None:
        return load_dataset(config).info
    if config.long_tail is not None:
        counts = long_tail_counts(max(info.train_class_counts), info.num_classes, config.long_tail.imbalance,
                                  config.long_tail.profile)
        note = long_tail_note(config.long_tail.profile, config.long_tail.imbalance, sum(counts))
        info = replace(info, train_size=sum(counts), train_class_counts=tuple(counts), notes=info.notes + (note,))
    if getattr(config, "val_fraction", 0):
        info = split_info(info, config.val_fraction)
    return info
