"""The library of ``python -m cohort.tune``: Tune's trial function (one whole cohort per trial), the
callback through which the driver, the one MLflow writer, keeps a child run per trial, the
scheduler and search algorithm of a space file, and the sweep's resources and ranking.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError
from cohort.console.display import Display, RunsDisplay, count_trials, runtime_mode
from cohort.topology import Topology
from cohort.tracking.tracker import Tracker
from cohort.tuning.callbacks import ChildRunsCallback
from cohort.worker.report import OBJECTIVE

# The trial's own process only waits for its trainer: the peers' workers hold the CPUs. (Tune
# refuses a trial with no resources at all.)
TRIAL_CPU = 0.01


def trial_topology(base: dict[str, Any], sampled: dict[str, Any]):
    """A trial's resolved topology: ``base`` with the sampled values applied (CohortError if invalid)."""
    from cohort.topology import topology_from_dict

    return topology_from_dict(base, "sampled topology", sampled)


# --------------------------------------------------------------------------- one trial


def share_datasets(topologies: Iterable[Topology]) -> dict[str, Any]:
    """The data of these topologies (a sweep's, a study's runs'), each distinct dataset loaded here
    once and put in Ray's object store: {``dataset_identity``: its ObjectRef}. Every trial whose
    topology loads one of them hands it to its workers (``trial_dataset``), as ``cohort.run`` does:
    one decoded copy for the whole sweep instead of one per worker of every trial, and a dataset
    that cannot be read stops the sweep before its first trial."""
    import ray

    from cohort.datasets import dataset_identity, load_dataset

    shared: dict[str, Any] = {}
    for topology in topologies:
        key = dataset_identity(topology.data, topology.seed)
        if key not in shared:
            shared[key] = ray.put(load_dataset(topology.data, topology.seed))
    return shared


def trial_dataset(shared: dict[str, Any], topology: Topology):
    """The shared dataset (an ObjectRef) of a trial's topology; None when its sampled values load
    other data (a sampled ``data.*`` setting, or a seed that draws the validation split): its
    workers then load it themselves."""
    from cohort.datasets import dataset_identity

    return shared.get(dataset_identity(topology.data, topology.seed))


def cohort_trial(sampled: dict[str, Any], base: dict[str, Any], objective: str, cpus_per_peer: float, threads: int,
                 storage: str, weights: dict[str, Any] | None = None, resource_requests: bool = True,
                 datasets: dict[str, Any] | None = None) -> None:
    """Tune's function trainable: one whole cohort with the sampled values applied.

    The cohort starts from Tune's checkpoint when there is one (PBT's exploit, or a resumed
    sweep), with this trial's values, and reports each epoch with its checkpoint to Tune.
    ``datasets``: the sweep's data, loaded once by its driver (``share_datasets``).
    ``resource_requests``: whether its fit tells the cluster's autoscaler its resources (no: the
    sweep's driver started this Ray on its machine; ``cohort.driver.launch.make_trainer``).
    """
    import uuid

    import ray.tune
    from ray.util.queue import Queue

    from cohort.driver.launch import fit_in_background, fit_messages, make_trainer
    from cohort.driver.trainer import report_forwarder_class

    # An invalid sample fails this trial with the reason; the sweep goes on.
    topology = trial_topology(base, sampled)
    # The workers may have to wait until the previous trial's have released their CPUs (Ray Train
    # passes this process's setting on to the trainer it starts).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    trial = ray.tune.get_context().get_trial_id()
    # One report at a time: like TuneReportCallback, Train waits while Tune decides on the last.
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # A fresh Train run each time: Train would otherwise resume the run of that name from its own
    # last checkpoint instead of starting from the one Tune hands this trial.
    trainer = make_trainer(topology, cpus_per_peer, threads, storage, f"{topology.name}-{trial}-{uuid.uuid4().hex[:6]}",
                           objective=objective, callbacks=(report_forwarder_class()(reports),),
                           initial_checkpoint=ray.tune.get_checkpoint(), weights=weights,
                           dataset=trial_dataset(datasets or {}, topology),
                           resource_requests=resource_requests)
    thread, outcome = fit_in_background(trainer, wake=reports)
    for metrics, checkpoint in fit_messages(thread, reports):
        if checkpoint is not None:
            checkpoint = ray.tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        ray.tune.report(metrics, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


# --------------------------------------------------------------------------- MLflow and the trial lines


class SweepCallback(ChildRunsCallback):
    """Tune callback (runs in the driver): child MLflow runs, and one line per trial event.

    Every child run holds the trial's resolved topology as ``topology.yaml``, as ``cohort.run``'s
    runs do (``base``: the sweep's topology as plain data; PBT's new values rewrite the file).
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, epochs: int, metric: str,
                 state_file: Path, base: dict[str, Any] | None = None, total: int = 0, display: str = "auto"):
        super().__init__(tracking_uri, experiment, parent_run_id, state_file, total, display)
        self.base = base
        self.epochs = epochs
        self.metric = metric
        self.configs: dict[str, dict[str, Any]] = {}  # each trial's values as last started (PBT changes them)
        self.changes: dict[str, dict[str, Any]] = {}  # values PBT changed, to log with the trial's next epoch

    def create_child(self, trial) -> Tracker:
        run = self.new_child(f"trial-{trial.trial_id}", {"cohort.trial_id": trial.trial_id})
        run.log_params(dict(trial.config))
        self.log_topology(run, trial.config)
        return run

    def runs(self, trials) -> RunsDisplay:
        """The overall progress line (made at this session's first event: what finished before counts as done)."""
        if getattr(self, "_runs", None) is None:
            finished, _ = count_trials(trials)
            self.finished_here = 0
            self._runs = RunsDisplay(Display(runtime_mode(getattr(self, "display", "auto"))),
                                     max(getattr(self, "total", 0), len(trials)), already_done=finished)
        return self._runs

    def show(self, trials, text: str, finished: bool = False, **fields: Any) -> None:
        runs = self.runs(trials)
        _, running = count_trials(trials)
        runs.update(self.finished_here, running)
        runs.event(text, finished, **fields)

    def log_topology(self, run: Tracker, config: dict[str, Any]) -> None:
        """The trial's topology, with these sampled values, as its run's ``topology.yaml``."""
        if self.base is None:
            return
        try:
            topology = trial_topology(self.base, dict(config))
        except CohortError:
            return  # an invalid sample: the trial fails, and its run says why (cohort.error)
        run.log_topology(topology)

    def on_trial_start(self, iteration, trials, trial, **info):
        run = self.child(trial)
        config = dict(trial.config)
        before = self.configs.setdefault(trial.trial_id, config)
        if config != before:
            # PBT restarts this trial from a better trial's checkpoint with perturbed values.
            self.changes[trial.trial_id] = {key: value for key, value in config.items() if before.get(key) != value}
            self.configs[trial.trial_id] = config
            self.log_topology(run, config)
        self.show(trials, f"trial {trial.trial_id} started: {sampled_text(trial.config)}", trial=trial.trial_id,
                  config=dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self.child(trial)
        epoch = int(result.get("epoch", 0))
        changed = self.changes.pop(trial.trial_id, None)
        if changed:
            run.client.set_tag(run.run_id, f"cohort.pbt.epoch_{epoch:03d}", json.dumps(changed))
            self.show(trials, f"trial {trial.trial_id} continues from a better trial's checkpoint (PBT) at epoch "
                              f"{epoch} with {sampled_text(changed)}", trial=trial.trial_id, epoch=epoch, changed=changed)
            self.last_epoch[trial.trial_id] = epoch - 1  # the trial's history goes on from the copied epoch
        self.log_result(run, trial, result)
        value = result.get(OBJECTIVE, math.nan)
        self.show(trials, f"trial {trial.trial_id} epoch {epoch}/{self.epochs}: {self.metric} = {value:.4f}",
                  trial=trial.trial_id, epoch=epoch, epochs=self.epochs, objective=value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run = self.child(trial)
        epoch = self.last_epoch.get(trial.trial_id, 0)
        early = epoch < self.epochs
        run.client.set_tag(run.run_id, "cohort.stopped_early", str(early).lower())
        run.finish("FINISHED")
        self.finished_here += 1
        self.show([t for t in trials if t is not trial], f"trial {trial.trial_id} stopped early by the scheduler after "
                  f"epoch {epoch}" if early else f"trial {trial.trial_id} finished", True, trial=trial.trial_id,
                  epoch=epoch, stopped_early=early)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = self.log_failure(self.child(trial), trial)
        self.finished_here += 1
        self.show([t for t in trials if t is not trial], f"trial {trial.trial_id} failed: {reason}", True,
                  trial=trial.trial_id, error=reason)


def sampled_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={short_value(value)}" for key, value in config.items())


def short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- the sweep


def make_scheduler(space, topology: Topology):
    """Tune's scheduler for the space file's ``scheduler`` section; every one counts in epochs."""
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        PopulationBasedTraining,
    )

    from cohort.tuning.search_space import tune_distribution

    settings = space.scheduler
    if settings.name == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=topology.train.epochs, grace_period=settings.grace_period,
                             reduction_factor=settings.reduction_factor)
    if settings.name == "pbt":
        class CohortPBT(PopulationBasedTraining):
            """PBT that leaves a trial's last epoch alone: exploiting then would restart a cohort
            with nothing left to train and hand it the better trial's result as its own."""

            def on_trial_result(self, tune_controller, trial, result):
                if result.get("epoch", 0) >= topology.train.epochs:
                    return self.CONTINUE
                return super().on_trial_result(tune_controller, trial, result)

        return CohortPBT(
            time_attr="epoch", perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations={key: tune_distribution(spec) for key, spec in space.mutations().items()},
            quantile_fraction=settings.quantile_fraction, resample_probability=settings.resample_probability,
            synch=settings.synch)
    return FIFOScheduler()


def reuses_trial_processes(space) -> bool:
    """Whether Tune hands a finished trial's process to the next trial (``reuse_actors``) instead of
    starting a new one: about 6 s a trial on a 2-core VM (a process importing torch, MLflow and Ray
    Train, and Tune's wait for it), and 2 to 3 s more of the next trial's fit. Only where every trial
    runs to its end (the FIFO scheduler): ASHA and PBT stop a trial inside its fit, and Tune then
    offers that process to the next trial while the fit's thread is still alive, which errs that trial
    ("Could not re-use actor", ``FunctionTrainable.reset_config``)."""
    return space.scheduler.name == "fifo"


def check_pbt(space, topology: Topology, where: str) -> None:
    """PBT copies checkpoints at its perturbation epochs: there must be some, inside the run."""
    if space.scheduler.name != "pbt":
        return
    interval, epochs = space.scheduler.perturbation_interval, topology.train.epochs
    if interval >= epochs:
        raise CohortError(f"scheduler.perturbation_interval: {interval} epochs leaves no perturbation in a run of "
                          f"{epochs} epochs (train.epochs)", where)
    every = topology.train.checkpoint_every
    if interval % every:
        raise CohortError(f"scheduler.perturbation_interval: {interval} is not a multiple of train.checkpoint_every "
                          f"({every}): PBT copies the checkpoint of the epoch it perturbs at", where)


def plan_resources(num_peers: int, samples: int, cpus: float, max_concurrent: int | None,
                   cpus_per_peer: float | None) -> tuple[int, float]:
    """How many trials run at once, and each peer's CPUs: a whole CPU per peer where the cluster
    has enough, and at least two trials at once where it has two CPUs (peers then share them);
    never more CPUs than the cluster has (a trial waiting for CPUs would wait forever)."""
    concurrent = max_concurrent or min(samples, max(1, int(cpus // num_peers), min(int(cpus), 2)))
    if cpus_per_peer is None:
        cpus_per_peer = min(1.0, math.floor((cpus - concurrent * TRIAL_CPU) / (concurrent * num_peers) * 100) / 100)
        if cpus_per_peer < 0.01:
            raise CohortError(f"{concurrent} trials of {num_peers} peers do not fit on {cpus:g} CPUs "
                              "(lower max_concurrent)", "max_concurrent")
    needed = cpus_per_peer * num_peers + TRIAL_CPU
    if needed > cpus + 1e-9:
        raise CohortError(f"one trial needs {needed:g} CPUs ({num_peers} peers x {cpus_per_peer:g}, and the trial "
                          f"itself {TRIAL_CPU:g}), the Ray cluster has {cpus:g}", "resources.cpus_per_peer")
    concurrent = min(concurrent, max(1, int((cpus + 1e-9) // needed)))
    return concurrent, cpus_per_peer



def ranked_trials(results, mode: str) -> list[dict[str, Any]]:
    """Every trial with its last reported objective, best first; failed trials last."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        value = metrics.get(OBJECTIVE)
        rows.append({
            "trial": metrics.get("trial_id") or Path(str(result.path)).name,
            "config": result.config or {},
            "value": value if isinstance(value, (int, float)) and math.isfinite(value) else None,
            "epochs": int(metrics.get("epoch", 0)),
            "error": result.error is not None,
        })
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row["value"] is None, sign * row["value"] if row["value"] is not None else 0))
    return rows



def make_search(space, topology: Topology, concurrent: int):
    """Tune's search algorithm for the space file's ``search``."""
    if space.search.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=topology.seed)
    from ray.tune.search import BasicVariantGenerator

    # Seeded by the topology, so a sweep samples the same values when run again.
    return BasicVariantGenerator(random_state=topology.seed, max_concurrent=concurrent)


def expected_trials(space, samples: int) -> int:
    """The trials of a sweep: each sample runs every combination of the grid values."""
    return samples * math.prod(len(spec["grid"]) for spec in space.space.values() if "grid" in spec)


def unfinished_trials(sweep_dir: Path, expected: int) -> int:
    """Trials Tune never created, and those its saved state (which --resume reads) leaves to run:
    after Ctrl-C Tune saves the running trials as pending and returns normally."""
    import ray.tune

    saved = ray.tune.ExperimentAnalysis(str(sweep_dir)).trials
    return expected - len(saved) + sum(1 for trial in saved if trial.status not in ("TERMINATED", "ERROR"))
