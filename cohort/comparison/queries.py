"""MLflow reads for the comparison: the store, which runs, their final metrics and params, and the
topology each run logged."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cohort.comparison.runs import (
    ENSEMBLE,
    CohortRun,
    Edge,
    overlay,
    rank_order,
    reported_peers,
    topology_edges,
)
from cohort.config.errors import CohortError, first_line
from cohort.tracking.tracker import logged_topology


def connect(uri: str):
    """An MlflowClient for an existing, readable store (reading must never create an empty one)."""
    from cohort.tracking.tracker import existing_store_client

    # Downloading a few small reliability files should not draw progress bars between the notes.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        raise CohortError(f"MLflow tracking store {uri!r}: no such database file (train a cohort first, "
                          "or pass --tracking-uri)")
    try:
        client = existing_store_client(uri, "--tracking-uri")  # quiets MLflow's logging first
        client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is not usable
        raise CohortError(f"MLflow tracking store {uri!r} is not usable: {first_line(error)}") from None
    return client


def experiment_names(client) -> list[str]:
    return sorted(experiment.name for experiment in all_pages(client.search_experiments))


def find_runs(client, experiments: list[str], run_ids: list[str]) -> list:
    """The MLflow runs asked for: every live run of each experiment (oldest first), then each
    ``--runs`` id, without repeats."""
    found: dict[str, Any] = {}
    for name in dict.fromkeys(experiments):
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise CohortError(f"--experiment {name!r}: no such experiment "
                              f"(experiments: {', '.join(experiment_names(client)) or 'none'})")
        runs = all_pages(lambda page_token=None, experiment_id=experiment.experiment_id: client.search_runs(
            [experiment_id], order_by=["attributes.start_time ASC"], page_token=page_token))
        found.update((run.info.run_id, run) for run in runs)
    for run_id in run_ids:
        run = get_run(client, run_id)
        found.setdefault(run.info.run_id, run)
    return list(found.values())


def get_run(client, run_id: str):
    """A run by full id or by a unique prefix of one."""
    from mlflow.exceptions import MlflowException

    if len(run_id) == 32:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run
        raise CohortError(f"--runs {run_id!r}: no such run")
    # MLflow cannot search by id prefix: look through the live runs of every experiment.
    experiment_ids = [experiment.experiment_id for experiment in all_pages(client.search_experiments)]
    every = all_pages(lambda page_token=None: client.search_runs(experiment_ids, page_token=page_token))
    matches = [run for run in every if run.info.run_id.startswith(run_id.lower())] if run_id else []
    if len(matches) != 1:
        raise CohortError(f"--runs {run_id!r}: " + ("no such run" if not matches else
                                                    f"{len(matches)} runs start with it; give more of the id"))
    return matches[0]


def all_pages(search) -> list:
    """Every item of a paged MLflow search (one page holds at most 1000)."""
    items, token = [], None
    while True:
        page = search(page_token=token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def load_runs(client, runs: list) -> tuple[list[CohortRun], int]:
    """The cohort runs among ``runs`` and how many were skipped for having no peer metrics
    (a sweep's parent run, a run that failed before its first epoch)."""
    experiments: dict[str, str] = {}
    parents: dict[str, Any] = {}
    loaded = []
    for run in runs:
        metrics = dict(run.data.metrics)
        peers = reported_peers(metrics)
        if not peers:
            continue
        # A sweep trial logs only its sampled values as params: the rest of its topology is its parent's.
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id and parent_id not in parents:
            parents[parent_id] = parent_run(client, parent_id)
        parent = parents.get(parent_id) if parent_id else None
        params = overlay(parent.data.params if parent else {}, run.data.params)
        rank_tag = run.data.tags.get("cohort.peers") or (parent.data.tags.get("cohort.peers") if parent else None)
        experiment_id = run.info.experiment_id
        if experiment_id not in experiments:
            experiments[experiment_id] = client.get_experiment(experiment_id).name
        loaded.append(CohortRun(run.info.run_id, experiments[experiment_id], rank_order(peers, rank_tag), params,
                                metrics, f"{ENSEMBLE}/acc" in metrics, logged_edges=logged_edges(client, run.info.run_id)))
    return loaded, len(runs) - len(loaded)


def parent_run(client, run_id: str):
    """A sweep trial's parent run, or None once it has been removed from the store."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


# Run id -> the edges of its topology.yaml (None: the run has none). A run logs its topology when it
# starts, before any metric, and never again: once a run has peer metrics, the answer cannot change.
LOGGED_EDGES: dict[str, tuple[Edge, ...] | None] = {}


def logged_edges(client, run_id: str) -> tuple[Edge, ...] | None:
    """The edges of the resolved topology the run logged (``topology.yaml``), read once per run id.

    None for a run without that artifact (sweep trials before they logged theirs: their edges come
    from their params and their parent's, see ``runs.edges_of``), and for one whose file no longer
    validates (logged by an older cohort): the params still describe those.
    """
    if run_id not in LOGGED_EDGES:
        topology = logged_topology(client, run_id, required=False)
        LOGGED_EDGES[run_id] = topology_edges(topology) if topology is not None else None
    return LOGGED_EDGES[run_id]


