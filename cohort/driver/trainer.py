"""The ``TorchTrainer`` a cohort fits: Ray Train's, without the two helper actors a cohort never uses.

Ray Train (2.60) starts, for every fit, besides its controller and one actor per worker:

- a ``DatasetManager`` actor, whether or not the trainer was given Ray Datasets (cohort gives it
  none: its data reaches the workers through the object store or a batch producer,
  ``cohort.datasets``);
- a detached ``PlacementGroupCleaner`` actor, which removes the run's placement group should the
  controller die without removing it itself.

Each is one more Python process to start and import, on the path to the first step. Measured on a
2-core VM (three workers whose function only returns): 14–16 s from ``fit()`` to the function,
10–11 s without them. A cohort is driven by its own process (a command, a Tune trial, a notebook):
when the controller ends, normally or by an error, it removes its placement group; when the
driver's process ends, Ray removes every placement group of its job. What the cleaner adds is the
case of a controller killed from outside (out of memory) while its driver lives on, in a notebook:
its placement group then holds its CPUs until the driver ends (docs/ray.md).

The two are dropped by their Ray classes; where this Ray has neither (a newer Ray renamed them), the
trainer is Ray's own, unchanged (``tests/test_layout.py`` fails on this Ray if either is missing).
"""
from __future__ import annotations

import functools
from typing import Any


def unused_callback_classes() -> tuple[type, ...]:
    """Ray Train's callback classes that start the helper actors a cohort does not use (empty where
    this Ray has none of them)."""
    classes = []
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        classes.append(DatasetsCallback)
    except ImportError:
        pass
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        classes.append(PlacementGroupCleanerCallback)
    except ImportError:
        pass
    return tuple(classes)


@functools.cache
def cohort_trainer_class() -> type:
    """``TorchTrainer`` without the callbacks of ``unused_callback_classes`` (a class made on first
    use, so that importing this module imports no Ray)."""
    from ray.train.torch import TorchTrainer

    unused = unused_callback_classes()

    class CohortTrainer(TorchTrainer):
        """Ray's ``TorchTrainer`` without a Ray Datasets manager and a placement group cleaner."""

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if getattr(self, "datasets", None):  # never from cohort; Ray's own behaviour if so
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, unused)]

    return CohortTrainer
