"""A study as one Ray Tune experiment: a FIFO grid over (arm, seed), every trial one whole cohort
(``cohort.tuning.sweep.cohort_trial``), and the driver's callback that keeps MLflow (a child run per
(arm, seed) under the study's parent run) and prints one line per finished run with the count.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cohort.console.display import Display, RunsDisplay, count_trials, runtime_mode
from cohort.tracking.tracker import Tracker
from cohort.tuning.callbacks import ChildRunsCallback
from cohort.worker.report import is_metric, metric_key

ARM_TAG, SEED_TAG, STUDY_TAG = "cohort.study.arm", "cohort.study.seed", "cohort.study"


def run_label(arm: str, seed: int) -> str:
    return f"{arm}/seed-{seed}"


def study_trial(config: dict[str, Any], arms: dict[str, dict[str, Any]], objectives: dict[str, str],
                cpus_per_peer: float, threads: int, storage: str, weights: dict[str, dict[str, Any]],
                resource_requests: bool = True, datasets: dict[str, Any] | None = None) -> None:
    """Tune's trainable of a study: the arm's topology with the run's seed, as one cohort
    (``datasets``: the runs' data, decoded once by the study's driver: ``run_datasets``)."""
    from cohort.tuning.sweep import cohort_trial

    arm, seed = config["run"]["arm"], int(config["run"]["seed"])
    cohort_trial({"seed": seed}, arms[arm], objectives[arm], cpus_per_peer, threads, storage, weights.get(arm),
                 resource_requests, datasets)


def run_datasets(arms: dict[str, dict[str, Any]], runs: list[tuple[str, int]]) -> dict[str, Any]:
    """Each distinct dataset of the study's runs (an arm with a seed), loaded once here and put in
    Ray's object store for their workers (``cohort.tuning.sweep.share_datasets``)."""
    from cohort.tuning.sweep import share_datasets, trial_topology

    return share_datasets(trial_topology(arms[arm], {"seed": seed}) for arm, seed in runs)


def grid(runs: list[tuple[str, int]]) -> dict[str, Any]:
    """Tune's param space: one grid entry per (arm, seed), in the study's order (seed by seed)."""
    import ray.tune

    return {"run": ray.tune.grid_search([{"arm": arm, "seed": seed} for arm, seed in runs])}


class StudyCallback(ChildRunsCallback):
    """Tune callback (in the driver, the one MLflow writer): a child run per (arm, seed), its epochs,
    its final artifacts (weights, reliability bins, final metrics: what ``cohort.run`` logs), and
    the progress lines. The children's ids live in ``state_file`` (arm/seed -> run id)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, study_name: str,
                 arms: dict[str, dict[str, Any]], roles: dict[str, dict[str, str]], total: int, state_file: Path,
                 already_done: int = 0, display: str = "auto"):
        super().__init__(tracking_uri, experiment, parent_run_id, state_file, total, display)
        self.study_name = study_name
        self.arms = arms  # arm -> its resolved topology as plain data
        self.roles = roles  # arm -> {role: peer}
        self.already_done = already_done
        self.started = time.perf_counter()

    def __setstate__(self, state):
        # Tune gives a resumed study back the callback it saved: a new session, with its own clock;
        # what finished before is counted from MLflow at its first event (``session_start``).
        self.__dict__.update(state)
        self.finished_here, self.started, self.already_done = 0, time.perf_counter(), None
        self._runs = None

    def session_start(self) -> None:
        """After --resume: the runs that had finished (or failed) before this session."""
        if self.already_done is None:
            statuses = [self.store.client.get_run(run_id).info.status for run_id in self.children.values()]
            self.already_done = sum(status in ("FINISHED", "FAILED") for status in statuses)

    def child_key(self, trial) -> str:
        return run_label(trial.config["run"]["arm"], int(trial.config["run"]["seed"]))

    def child(self, trial) -> Tracker:
        self.session_start()
        return super().child(trial)

    def create_child(self, trial) -> Tracker:
        from cohort.studies.file import with_seed
        from cohort.topology import topology_from_dict

        arm, seed = trial.config["run"]["arm"], int(trial.config["run"]["seed"])
        topology = with_seed(topology_from_dict(self.arms[arm], arm), seed)
        run = self.new_child(f"{arm}-seed{seed}", {
            STUDY_TAG: self.study_name, ARM_TAG: arm, SEED_TAG: str(seed), "cohort.topology": topology.name,
            "cohort.peers": ",".join(topology.peer_names), "cohort.trial_id": trial.trial_id})
        run.log_params(topology.flatten())
        run.log_topology(topology)
        return run

    def runs(self) -> RunsDisplay:
        """The overall progress line, from this session's start (``session_start``)."""
        if getattr(self, "_runs", None) is None:
            self.session_start()
            self._runs = RunsDisplay(Display(runtime_mode(getattr(self, "display", "auto"))), self.total,
                                     self.already_done)
            self._runs.started = self.started
        return self._runs

    def on_trial_start(self, iteration, trials, trial, **info):
        run = self.child(trial)
        if run.client.get_run(run.run_id).info.status == "KILLED":  # interrupted before, resumed now
            run.client.update_run(run.run_id, status="RUNNING")
        runs = self.runs()
        runs.update(self.finished_here, count_trials(trials)[1])
        arm, seed = trial.config["run"]["arm"], trial.config["run"]["seed"]
        runs.event(f"{run_label(arm, seed)} started", arm=arm, seed=seed)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.log_result(self.child(trial), trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        from cohort.tracking.tracker import flat_metrics, log_checkpoint_artifacts

        run = self.child(trial)
        result = trial.last_result or {}
        run.log_json({"epoch": result.get("epoch"), **flat_metrics({k: v for k, v in result.items() if is_metric(k)})},
                     "final_metrics.json")
        log_checkpoint_artifacts(run, trial.checkpoint)
        run.finish("FINISHED")
        arm, seed = trial.config["run"]["arm"], trial.config["run"]["seed"]
        self.progress(trials, trial, f"{run_label(arm, seed)} done: {accuracies(self.roles[arm], result)}",
                      metrics={role: result.get(metric_key(peer, "acc")) for role, peer in self.roles[arm].items()})

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = self.log_failure(self.child(trial), trial)
        self.progress(trials, trial, f"{run_label(trial.config['run']['arm'], trial.config['run']['seed'])} "
                                     f"failed: {reason}", error=reason)

    def progress(self, trials, trial, event: str, **fields: Any) -> None:
        """A finished run's line under the overall progress: runs done, running, pending, time left."""
        self.finished_here += 1
        runs = self.runs()
        runs.update(self.finished_here, count_trials([t for t in trials if t is not trial])[1])
        arm, seed = trial.config["run"]["arm"], trial.config["run"]["seed"]
        runs.event(event, True, arm=arm, seed=seed, **fields)


def children_of(state_file: Path) -> dict[str, str]:
    """The study's child runs so far: ``arm/seed-N`` -> MLflow run id (the callback's state file)."""
    return json.loads(Path(state_file).read_text()) if Path(state_file).exists() else {}


def end_stopped(client, parent_run_id: str | None, state_file: Path, parent_status: str) -> None:
    """After a study stops early (Ctrl-C, a failure): its children still RUNNING marked KILLED, and
    its parent, if still RUNNING, ``parent_status``: no run of the study is left RUNNING."""
    for run_id in children_of(state_file).values():
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
    if parent_run_id is not None and client.get_run(parent_run_id).info.status == "RUNNING":
        client.set_terminated(parent_run_id, status=parent_status)


def accuracies(roles: dict[str, str], result: dict[str, Any]) -> str:
    """``"teacher 99.72%, student 99.44%"``: each role's final top-1."""
    parts = []
    for role, peer in roles.items():
        value = result.get(metric_key(peer, "acc"))
        parts.append(f"{role} {100 * value:.2f}%" if isinstance(value, (int, float)) else f"{role} -")
    return ", ".join(parts)


def objective_key(roles: dict[str, str]) -> str:
    """The metric each run reports to Tune: the accuracy of the arm's first role."""
    return metric_key(next(iter(roles.values())), "acc")
