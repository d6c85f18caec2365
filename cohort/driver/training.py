"""A cohort run from its topology to its logged result: the plan made while Ray starts, the MLflow
run, the training with each epoch shown and logged once, the final artifacts and peer models, and
a stopped run resumed from its last checkpoint. ``python -m cohort.run`` and the Python API
(``cohort.train``) both run a cohort through here."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError
from cohort.console.command import deferred_interrupt
from cohort.console.display import Display, EpochDisplay
from cohort.console.plan import describe_plan, summary_table
from cohort.datasets import DatasetInfo
from cohort.driver.cluster import RayOptions, cluster_node_labels
from cohort.driver.launch import (
    RUN_FILE,
    Plan,
    abort_fit,
    failure_reason,
    fit_cluster,
    fit_in_background,
    fit_messages,
    make_trainer,
    plan_while_ray_starts,
    progress_queue,
    return_progress_queue,
    storage_location,
)
from cohort.driver.trainer import CONTROLLER, is_controller_message
from cohort.topology import Topology
from cohort.tracking.logged_models import (
    exported_peers,
    log_peer_models,
    model_uri,
    peer_test_metrics,
    register_peer,
    registered_line,
    registry_tags,
    test_metric_names,
)
from cohort.tracking.tracker import Tracker
from cohort.worker.report import ENSEMBLE, cohort_key, evaluated, metric_key
from cohort.worker.ticker import is_step


@dataclass(frozen=True, kw_only=True)
class Trained:
    """A finished cohort run: where it is logged, its final metrics (``"<peer>/acc"``, ``"<peer>/ece"``,
    ``"ensemble/nll"``, ...), and every peer's final weights."""

    run_id: str
    experiment: str
    tracking_uri: str
    topology: Topology
    info: DatasetInfo
    metrics: dict[str, float]
    seconds: float
    weights: dict[str, dict[str, Any]] = field(repr=False)  # peer -> state_dict
    models: dict[str, dict[str, float]] = field(default_factory=dict)  # logged peer models -> their test metrics
    registered: tuple[str, ...] = ()

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(self.topology.peer_names)

    def model(self, peer: str):
        """The peer's trained network (a ``torch.nn.Module`` in evaluation mode, on the CPU)."""
        from cohort.evaluation.logged_run import build_models

        if peer not in self.weights:
            raise CohortError(f"unknown peer {peer!r} (peers: {', '.join(self.peers)})")
        return build_models(self.topology, self.weights, self.info)[peer]


def start_run(topology: Topology, tracking_uri: str, ray: RayOptions, storage: str | None,
              registrations: dict[str, str], display: Display) -> Trained:
    """Train ``topology`` (its checkpoints fetched, paths absolute) in a new MLflow run."""
    plan, tracker, cluster, marks = plan_while_ray_starts(ray, topology, tracking_uri)
    plan = fit_cluster(plan, cluster, cluster_node_labels())
    display.info(describe_plan(plan))

    run_name = f"{topology.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_location(storage)
    run_id = tracker.start(topology, run_name)
    tracker.client.set_tag(run_id, "cohort.ray_storage", storage)
    tracker.client.set_tag(run_id, "cohort.ray_name", run_name)
    if "://" not in storage:  # lets --resume take the run's folder as well as its MLflow id
        run_folder = Path(storage) / run_name
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    tracker.log_json({"train_class_counts": list(plan.info.train_class_counts), "train_size": plan.info.train_size,
                      "val_size": plan.info.val_size,
                      "test_size": plan.info.test_size, "notes": list(plan.info.notes),
                      "groups": {name: [c for c in range(plan.info.num_classes) if int(plan.groups[0][c]) == index]
                                 for index, name in enumerate(plan.groups[1])} if plan.groups else None},
                     "data.json")
    workers = f"{topology.num_workers} worker{'s' if topology.num_workers > 1 else ''}"
    display.info(f"\nMLflow run {run_id} (experiment {topology.experiment!r}); starting {workers}...")
    display.json("start", run_id=run_id, experiment=topology.experiment, epochs=topology.train.epochs)
    return train(plan, tracker, storage, run_name, logged_epochs=0, marks=marks, registrations=registrations,
                 display=display)


def resume_run(reference_text: str, tracking_uri: str | None, ray: RayOptions, register: list[str],
               display: Display) -> Trained:
    """Continue a stopped run (an MLflow run id, or its storage folder) from its last checkpoint, in
    the same MLflow run."""
    from cohort.tracking.logged_models import parse_registrations
    from cohort.tracking.tracker import existing_store_client, logged_topology, resolve_uri

    reference = Path(os.path.expanduser(reference_text))
    if (reference / RUN_FILE).is_file():
        saved = json.loads((reference / RUN_FILE).read_text())
        run_id, tracking_uri = saved["run_id"], tracking_uri or saved["tracking_uri"]
    else:
        run_id, tracking_uri = reference_text, resolve_uri(tracking_uri)
    client = existing_store_client(tracking_uri, f"--resume {reference_text}")
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - unknown id, unreachable store: the same answer
        raise CohortError(f"--resume {reference_text}: no such MLflow run in {tracking_uri} "
                          "(give a run id and --tracking-uri, or the run's storage folder)") from None
    if run.info.status == "FINISHED":
        raise CohortError(f"--resume {reference_text}: run {run_id} has already finished")
    storage, run_name = run.data.tags.get("cohort.ray_storage"), run.data.tags.get("cohort.ray_name")
    if not storage or ("://" not in storage and not (Path(storage) / run_name).is_dir()):
        raise CohortError(f"--resume {reference_text}: the run's checkpoints ({storage}/{run_name}) are gone")
    topology = logged_topology(client, run_id)
    registrations = parse_registrations(register, topology)
    history = client.get_metric_history(run_id, metric_key(topology.peer_names[0], "acc"))
    logged = max((metric.step for metric in history), default=0)
    plan, tracker, cluster, marks = plan_while_ray_starts(ray, topology, tracking_uri)
    tracker = tracker.for_run(run_id)
    plan = fit_cluster(plan, cluster, cluster_node_labels())
    client.update_run(run_id, status="RUNNING")
    display.info(f"resuming MLflow run {run_id} ({topology.name}) after epoch {logged} of {topology.train.epochs}")
    display.json("start", run_id=run_id, experiment=topology.experiment, epochs=topology.train.epochs, after=logged)
    return train(plan, tracker, storage, run_name, logged_epochs=logged, marks=marks, registrations=registrations,
                 display=display)




def train(plan: Plan, tracker: Tracker, storage: str, run_name: str, logged_epochs: int,
          marks: dict[str, float] | None = None, registrations: dict[str, str] | None = None,
          display: Display | None = None) -> Trained:
    """Fit the cohort, show and log each epoch once, and log the final artifacts: the weights,
    each trained peer as an MLflow model (registered where ``registrations``, {peer: name}, says)."""
    from cohort.driver.reclaim import Reclaimer
    from cohort.driver.startup import asked_since, describe_startup, startup_breakdown

    topology = plan.topology
    progress = progress_queue()  # the last fit's, when this process has run one on this Ray
    reclaimer = Reclaimer()  # the placement groups there before this fit are not its own
    display = display or Display("log")
    # Rank 0's step counter feeds the bar inside an epoch: sent only where a terminal draws it.
    trainer = make_trainer(topology, plan.cpus_per_peer, plan.threads, storage, run_name, progress=progress,
                           dataset=plan.dataset, weights=plan.weights, live_steps=display.mode == "tty",
                           pipeline=plan.pipeline, abortable=True)
    epochs = EpochDisplay(display, evaluated(topology), topology.train.epochs, done=logged_epochs)
    started = time.perf_counter()
    final: dict[str, Any] = {}
    thread, outcome = fit_in_background(trainer, wake=progress)
    controller = None  # the fit's Ray Train controller, once it has announced itself (to abort it)
    # Ctrl-C is taken between two MLflow writes, never in the middle of one (cohort.config.errors).
    with deferred_interrupt() as interrupted:
        for report in fit_messages(thread, progress, stopped=interrupted.is_set):
            if is_controller_message(report):
                controller = report[CONTROLLER]
                continue
            if is_step(report):  # rank 0's step counter inside an epoch (cohort.console.display)
                epochs.step(report)
                continue
            final = report
            if marks is not None:
                breakdown = startup_breakdown(marks, {peer: report.get(metric_key(peer, "startup")) or {}
                                                      for peer in topology.peer_names})
                if breakdown:
                    marks = None  # once per command
                    epochs.close()  # the bar's line cleared first
                    display.info(describe_startup(breakdown, asked_since()))
                    report = {**report, **{cohort_key(f"startup/{part}_s"): value for part, value in breakdown.items()}}
            # After a restart the epochs since the last checkpoint come again: log each once.
            if report["epoch"] <= logged_epochs:
                continue
            logged_epochs = report["epoch"]
            epochs.epoch(report)
            tracker.log_epoch(report)
    epochs.close()
    if interrupted.is_set():
        tracker.finish("KILLED")
        print(f"interrupted: continue with python -m cohort.run --resume {tracker.run_id}", file=sys.stderr)
        # The workers stop too (a notebook's Ray outlives this call); a second Ctrl-C stops waiting.
        try:
            if abort_fit(thread, controller, progress):
                return_progress_queue(progress)  # the fit ended: nothing sends to it any more
        except KeyboardInterrupt:
            pass
        raise KeyboardInterrupt
    thread.join()
    return_progress_queue(progress)
    if "error" in outcome:
        # A controller killed from outside (out of memory, a kill) leaves its workers' placement group
        # to the job: their CPUs would stay reserved while a notebook's Ray lives on.
        reclaimer.settle(timeout=5.0)
        tracker.finish("FAILED")
        raise CohortError(f"training failed: {failure_reason(outcome['error'])} "
                          f"(MLflow run {tracker.run_id} marked FAILED)")

    result = outcome["result"]
    log_final_artifacts(tracker, result, final)
    weights = final_weights(topology, result)
    try:
        models = log_models(plan, tracker, weights, final, ensemble=ENSEMBLE in (registrations or {}))
    finally:
        tracker.finish("FINISHED")  # the training is done and its weights logged, whatever happens to the models
    registered = []
    for peer, name in (registrations or {}).items():
        version, existed = register_peer(plan.tracking_uri, tracker.run_id, peer, name,
                                         registry_tags(topology, peer, models[peer], tracker.run_id))
        registered.append(registered_line(peer, name, version, existed))
    seconds = time.perf_counter() - started
    display.summary(f"\ndone in {seconds:.0f}s\n")
    display.summary(summary_table(plan, final))
    if plan.payload is not None:  # representations travelled: what each peer sent per step
        display.summary("\nexchanged per step: " + ", ".join(
            f"{peer} {final.get(metric_key(peer, 'exchange_bytes'), float('nan')):,.0f} bytes"
            for peer in topology.peer_names) + " (docs/representations.md)")
    display.summary(f"\nMLflow run {tracker.run_id} in experiment {topology.experiment!r} at {plan.tracking_uri}")
    display.summary(f"  look at it with: mlflow ui --backend-store-uri {plan.tracking_uri}")
    if models:
        display.summary(f"  trained peers as MLflow models: {model_uri(tracker.run_id, '<peer>')} ({', '.join(models)})")
    for line in registered:
        display.summary("  " + line)
    display.json("done", run_id=tracker.run_id, seconds=round(seconds, 1), epoch=final.get("epoch"),
                 metrics={key: value for key, value in final.items() if isinstance(value, (int, float))},
                 models=list(models or []), registered=registered)
    return Trained(run_id=tracker.run_id, experiment=topology.experiment, tracking_uri=plan.tracking_uri,
                   topology=topology, info=plan.info, seconds=seconds, weights=weights, models=models,
                   metrics={key: value for key, value in final.items() if isinstance(value, (int, float))},
                   registered=tuple(registered))



def log_final_artifacts(tracker, result, final: dict[str, Any]) -> None:
    from cohort.tracking.tracker import flat_metrics, log_checkpoint_artifacts

    tracker.log_json({"epoch": final.get("epoch"), **flat_metrics(final)}, "final_metrics.json")
    if final.get(cohort_key("workers")):
        tracker.log_json(final[cohort_key("workers")], "workers.json")  # rank -> peer, replica, node, device
    log_checkpoint_artifacts(tracker, result.checkpoint)




def final_weights(topology: Topology, result) -> dict[str, dict[str, Any]]:
    """Every peer's final weights, from the run's last checkpoint ({} without one)."""
    from cohort.worker.peer import read_weights

    if result.checkpoint is None:
        return {}
    with result.checkpoint.as_directory() as folder:
        return {peer: read_weights(str(Path(folder) / f"{peer}.pt"), f"weights/{peer}.pt") for peer in topology.peer_names}


def log_models(plan: Plan, tracker: Tracker, weights: dict[str, dict[str, Any]], final: dict[str, Any],
               ensemble: bool = False) -> dict[str, dict[str, float]]:
    """Each trained peer as ``models/<peer>`` (cohort.tracking.logged_models), and with ``ensemble``
    the cohort's ensemble as ``models/ensemble``: {peer: its test metrics}."""
    topology = plan.topology
    peers = exported_peers(topology) + ([ENSEMBLE] if ensemble else [])
    if not weights or not peers:
        return {}
    log_peer_models(tracker, topology, plan.info, plan.dataset, plan.groups, weights, final, peers=peers)
    names = test_metric_names(topology, plan.info, plan.groups)
    return {peer: peer_test_metrics(final, peer, names) for peer in peers}
