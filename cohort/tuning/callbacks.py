"""What the Tune callbacks of sweeps and studies share (in the driver, the one MLflow writer): one
MLflow child run per trial under the parent run, found again after a resume (the children's ids
in ``state_file``), every epoch logged once, a failed trial's reason, the overall progress line.
A callback keeps only plain data: Tune saves it with the experiment and gives it back on resume."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune import Callback

from cohort.driver.reclaim import Reclaimer
from cohort.tracking.tracker import Tracker
from cohort.worker.report import OBJECTIVE, is_metric


class ChildRunsCallback(Callback):
    """The base: subclasses say what a trial's child run is called and holds (``child_key``,
    ``create_child``) and what a person is shown."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, state_file: Path, total: int = 0,
                 display: str = "auto"):
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.state_file = Path(state_file)
        self.total, self.display = total, display  # the runs expected; the display mode (cohort.console.display)
        self.finished_here = 0
        self.last_epoch: dict[str, int] = {}  # trial id -> the last epoch its run holds
        self._store: Tracker | None = None
        self._runs = None

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key not in ("_store", "_runs")} | {
            "_store": None, "_runs": None, "finished_here": 0}

    @property
    def store(self) -> Tracker:
        """The experiment's store (made at the first event; not saved with the callback)."""
        if getattr(self, "_store", None) is None:
            self._store = Tracker(self.tracking_uri, self.experiment)
        return self._store

    @property
    def children(self) -> dict[str, str]:
        """Each trial's key -> its child run's id, as the state file holds them."""
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def child_key(self, trial) -> str:
        return trial.trial_id

    def create_child(self, trial) -> Tracker:
        """The trial's new child run, with what it holds from the start."""
        raise NotImplementedError

    def child(self, trial) -> Tracker:
        """The trial's child run: created on first sight, found again after a resume."""
        key = self.child_key(trial)
        children = self.children
        if key not in children:
            children[key] = self.create_child(trial).run_id
            self.state_file.write_text(json.dumps(children))
        run = self.store.for_run(children[key])
        if trial.trial_id not in self.last_epoch:
            # After a resume the epochs the run already holds in MLflow are done.
            history = run.client.get_metric_history(run.run_id, OBJECTIVE)
            self.last_epoch[trial.trial_id] = max((metric.step for metric in history), default=0)
        return run

    def new_child(self, run_name: str, tags: dict[str, str]) -> Tracker:
        run = self.store.client.create_run(self.store.experiment_id, run_name=run_name,
                                           tags={"mlflow.parentRunId": self.parent_run_id, **tags})
        return self.store.for_run(run.info.run_id)

    def log_result(self, run: Tracker, trial, result: dict[str, Any]) -> int:
        """The trial's epoch in its run, once (a resumed trial trains again the epochs after its last
        checkpoint); the epoch."""
        epoch = int(result.get("epoch", 0))
        if epoch > self.last_epoch.get(trial.trial_id, 0):
            run.log_epoch({**{k: v for k, v in result.items() if is_metric(k) or k == OBJECTIVE}, "epoch": epoch})
        self.last_epoch[trial.trial_id] = epoch
        return epoch

    def log_failure(self, run: Tracker, trial) -> str:
        """A failed trial's run: its reason as a tag, the run FAILED; the reason."""
        reason = trial_failure(trial)
        run.client.set_tag(run.run_id, "cohort.error", reason[:5000])
        run.finish("FAILED")
        return reason

    def on_experiment_end(self, trials, **info):
        if getattr(self, "_runs", None) is not None:
            self._runs.close()


class ReclaimCallback(Callback):
    """Tune callback (in the driver): once a second, gives back the CPUs that trials stopped in the
    middle of their fit still hold (``cohort.driver.reclaim``), so that the next trial gets them.
    ``reclaimer``: the driver's, made before the sweep starts (a resumed sweep's callback makes its
    own at its first step: Tune gives it back without one)."""

    def __init__(self, reclaimer: Reclaimer | None = None):
        self.reclaimer = reclaimer

    def __getstate__(self):
        return {"reclaimer": None}

    def on_step_end(self, iteration, trials, **info):
        if self.reclaimer is None:
            self.reclaimer = Reclaimer()
        self.reclaimer.reclaim(every=1.0)


def trial_failure(trial) -> str:
    """The one line that says why a trial failed."""
    from cohort.driver.launch import failure_reason

    path = getattr(trial, "error_file", None) or ""
    text = Path(path).read_text() if path and Path(path).exists() else str(getattr(trial, "error_msg", "") or "")
    for marker in ("CohortError:",):
        for line in text.splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return failure_reason(RuntimeError(text)) if text else "unknown error"
