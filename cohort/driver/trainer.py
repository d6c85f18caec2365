"""The ``TorchTrainer`` a cohort fits: Ray Train's, without the helper actors a cohort does not need.

Ray Train (2.60) starts, for every fit, besides its controller and one actor per worker:

- a ``DatasetManager`` actor, whether or not the trainer was given Ray Datasets (cohort gives it
  none: its data reaches the workers through the object store or a batch producer,
  ``cohort.datasets``);
- a detached ``PlacementGroupCleaner`` actor, which removes the run's placement group should the
  controller die without removing it itself.

Each is one more Python process to start and import, on the path to the first step. Measured on a
2-core VM (three workers whose function only returns): 14–16 s from ``fit()`` to the function,
10–11 s without the two.

The datasets manager is never needed. Nor is the cleaner. Where a run's controller ends by
itself, normally or by an error, it removes its placement group, and when its driver's process
ends, Ray removes every placement group of the job. Where something kills the controller while the
driver lives on, as Tune does with a trial that its scheduler stops (ASHA, PBT, a study's Ctrl-C),
the sweep's or the study's driver removes the placement group itself (``cohort.driver.reclaim``):
the cleaner, which asks the dashboard's state API, did nothing on a Ray without a dashboard, and a
trial's CPUs then stayed reserved until the driver ended. So does a single run's driver when its fit
fails, for a controller killed from outside (out of memory) while a notebook's driver lives on
(``cohort.driver.training.train``). On a Ray whose placement groups cohort cannot read that way (a
later Ray that changed its private table reader), the fits keep the cleaner (``cleaner``).

Ray Train also asks a Ray Data "autoscaling coordinator" (a detached actor, started by the first
fit of a Ray: one more process) to pass every fit's resources on to the cluster's autoscaler, and
waits for its answer before starting the workers. A Ray that cohort started itself on this machine
has no autoscaler to tell: there (``resource_requests=False``) the fits ask nothing, and no
coordinator starts. Measured on a 2-core VM (AMD EPYC, 2026-12-03): a one-epoch ``dml_pair``
run with its Ray's start took 25.6 and 23.9 s instead of 27.4 and 25.8.

The callbacks are dropped by their Ray classes; where this Ray has none of them (a newer Ray renamed
them), the trainer is Ray's own, unchanged (``tests/test_placement.py`` fails on such a Ray).

The other way round, a fit ends the actors of its run that its driver made for it (``run_actors``:
a codistilling run's snapshot board) when it returns or fails, with ``ray.kill`` (``end_actors``).
Left to Ray's reference counting, a board ended gracefully, a moment later; twice, on this VM, its
process then stayed: its Ray worker had shut down, the Python process had not, and it was still
running, 0.7 GB, after its Ray had stopped (docs/testing.md). ``ray.kill`` ends the process at once,
without the interpreter's shutdown. The nodes' batch producers (``cohort.datasets.producer``) are not
the driver's: the workers make them and drop them as they finish, and Ray has ended them the same
graceful way before the fit returns (seen: none left for a driver to kill; none seen to stay).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any


def unused_callback_classes(cleaner: bool = False) -> tuple[type, ...]:
    """Ray Train's callback classes that start helper actors a cohort does not need: the datasets
    manager's, and the placement group cleaner's unless ``cleaner`` (kept on a Ray whose placement
    groups cohort cannot read, ``cohort.driver.reclaim.readable``). Empty where this Ray has none."""
    classes = []
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        classes.append(DatasetsCallback)
    except ImportError:
        pass
    if not cleaner:
        try:
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
            classes.append(PlacementGroupCleanerCallback)
        except ImportError:
            pass
    return tuple(classes)


def end_actors(actors: Iterable[Any], kill: Callable[[Any], Any]) -> None:
    """``kill`` each of ``actors`` (``ray.kill``); one already gone, or whose Ray has stopped, is
    left as it is."""
    for actor in actors:
        try:
            kill(actor)
        except Exception:  # noqa: BLE001 - dead already, or no Ray left to ask: nothing to end
            pass


@functools.cache
def silent_scaling_policy_class() -> type | None:
    """Ray Train's fixed scaling policy without its resource requests to the autoscaling coordinator
    (None where this Ray has no such policy)."""
    try:
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    except ImportError:
        return None
    if not all(hasattr(FixedScalingPolicy, name) for name in REQUEST_METHODS):
        return None

    class SilentScalingPolicy(FixedScalingPolicy):
        """A fixed number of workers, asked of no autoscaler (a Ray of one machine has none)."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    return SilentScalingPolicy


# What SilentScalingPolicy replaces: Ray's calls to its autoscaling coordinator.
REQUEST_METHODS = ("after_controller_start", "_maybe_send_resource_request", "_send_resource_request",
                   "_cancel_resource_request")


@functools.cache
def cohort_trainer_class(resource_requests: bool = True, cleaner: bool = False) -> type:
    """``TorchTrainer`` without the callbacks of ``unused_callback_classes(cleaner)``, and without
    resource requests to an autoscaler unless ``resource_requests`` (a class made on first use, so that
    importing this module imports no Ray)."""
    from ray.train.torch import TorchTrainer

    unused = unused_callback_classes(cleaner)
    silent = None if resource_requests else silent_scaling_policy_class()

    class CohortTrainer(TorchTrainer):
        """Ray's ``TorchTrainer`` without the helper actors a cohort does not need, ending the
        ``run_actors`` its driver made for the run when the fit ends."""

        def __init__(self, *args: Any, run_actors: Iterable[Any] = (), **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.run_actors = tuple(run_actors)

        def fit(self):
            import ray

            try:
                return super().fit()
            finally:
                end_actors(self.run_actors, ray.kill)

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if getattr(self, "datasets", None):  # never from cohort; Ray's own behaviour if so
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, unused)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = controller_init_kwargs.get("scaling_policy")
            if silent is not None and type(policy) is silent.__base__:
                controller_init_kwargs["scaling_policy"] = silent(scaling_config=policy.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return CohortTrainer


# The key of the message that carries the controller's handle to the driver (``announce_controller``).
CONTROLLER = "cohort.controller"


def is_controller_message(message: Any) -> bool:
    return isinstance(message, dict) and CONTROLLER in message


@functools.cache
def controller_announcer_class() -> type:
    """A Ray Train controller callback that puts the controller's own actor handle in the driver's
    queue as the controller starts: ``{CONTROLLER: handle}``.

    The driver fits in a thread of its own (``cohort.driver.launch.fit_in_background``), where Ray
    Train registers no Ctrl-C handler of its own; with the handle the driver aborts the fit it
    stops following. A command's Ray ends with its process anyway, but a notebook's Ray outlives
    ``cohort.train``: without the abort its workers went on training after Ctrl-C, holding their
    CPUs, writing checkpoints a ``--resume`` would then race with."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class AnnounceController(ControllerCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_controller_start(self, train_run_context) -> None:
            import ray

            self.queue.put({CONTROLLER: ray.get_runtime_context().current_actor})

    return AnnounceController


@functools.cache
def report_forwarder_class() -> type:
    """A Ray Train callback (it runs in the trainer's controller) that hands every epoch's report, with
    the checkpoint Train has just persisted, to a Tune trial's own process through its queue:
    ``(metrics, checkpoint)``.

    Ray's ``TuneReportCallback`` forwards the metrics alone; PBT copies a better trial's checkpoint
    into a worse one, and a resumed sweep continues unfinished trials from theirs, so Tune must
    receive the checkpoints too. Made here, in a module that imports neither torch nor cohort's
    topology: the controller unpickles it, and imports no torch for it."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, reports):
            self.reports = reports

        def after_report(self, run_context, metrics, checkpoint):
            self.reports.put((metrics[0], checkpoint))

    return ForwardReports
