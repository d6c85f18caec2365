"""MLflow: one run per cohort run, written by one process (the driver).

SQLite allows one writer, so workers never talk to MLflow: rank 0 sends each epoch's metrics to
the driver, and the driver logs them here.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError, first_line
from cohort.topology import DEFAULT_TRACKING_URI, Topology

MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
TOPOLOGY_FILE = "topology.yaml"  # every cohort run logs its resolved topology under this name


def resolve_uri(uri: str | None, base: str | Path | None = None) -> str:
    """The tracking URI with a relative SQLite path made absolute (Ray and Tune change directories)."""
    uri = uri or DEFAULT_TRACKING_URI
    base = Path(base or os.getcwd())
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):]
        if not path.startswith("/"):
            return prefix + str((base / path).resolve())
    return uri


def _quiet_mlflow() -> None:
    # Database migrations and MLflow's own notices are not the user's business on every run.
    for name in ("alembic", "mlflow", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per error, no bars


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a cohort report (MLflow refuses the rest)."""
    return {
        key: float(value)
        for key, value in report.items()
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class Tracker:
    """The MLflow run of one cohort run."""

    def __init__(self, uri: str, experiment: str):
        _quiet_mlflow()
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._check_reachable(uri)
        try:
            mlflow.set_tracking_uri(uri)
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=self._artifact_root(uri, experiment))
        except Exception as error:  # noqa: BLE001 - any failure here means the store is not usable
            raise CohortError(f"MLflow tracking store {uri!r} is not usable: {first_line(error)}", "tracking.uri") from None
        self.run_id: str | None = None

    @staticmethod
    def _artifact_root(uri: str, experiment: str) -> str | None:
        # Beside a SQLite store, as `mlflow server` does; elsewhere the server decides.
        if not uri.startswith("sqlite:///"):
            return None
        folder = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment
        return folder.resolve().as_uri()

    @staticmethod
    def _check_reachable(uri: str) -> None:
        if uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///"):]).parent
            if not folder.is_dir():
                raise CohortError(f"MLflow tracking store {uri!r}: folder {str(folder)!r} does not exist", "tracking.uri")
            if not os.access(folder, os.W_OK):
                raise CohortError(f"MLflow tracking store {uri!r}: folder {str(folder)!r} is not writable", "tracking.uri")

    def for_run(self, run_id: str) -> Tracker:
        """A tracker of the run ``run_id``, in the same store and experiment (one client): a callback
        holds one per child run rather than moving one tracker from run to run."""
        other = copy.copy(self)
        other.run_id = run_id
        return other

    def start(self, topology: Topology, run_name: str | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name or topology.name,
                                     tags={"cohort.topology": topology.name, "cohort.peers": ",".join(topology.peer_names)})
        self.run_id = run.info.run_id
        self.log_params(topology.flatten())
        self.log_topology(topology)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_epoch(self, report: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        step = int(report["epoch"])
        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in flat_metrics(report).items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_topology(self, topology: Topology) -> None:
        """The run's resolved topology, as ``TOPOLOGY_FILE``: what ``logged_topology`` reads back."""
        self.log_text(topology.to_yaml(), TOPOLOGY_FILE)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, sort_keys=True), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_folder(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def log_checkpoint_artifacts(tracker: Tracker, checkpoint) -> None:
    """A finished run's results from its last Ray checkpoint: the peers' weights (``weights/``) and
    reliability bins (``reliability/``, JSON), each with its diagram (PNG), drawn here from the bins;
    the training state for restarts stays out."""
    if checkpoint is None:
        return
    from cohort.metrics.reliability import BINS_PREFIX

    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory(prefix="cohort-diagrams-") as drawn:
        for path in sorted(Path(folder).iterdir()):
            if path.name.endswith((".state.pt", ".manifest.json")):
                continue
            if path.suffix == ".pt":
                tracker.log_file(path, "weights")
            elif path.suffix in (".png", ".json"):
                tracker.log_file(path, "reliability")
                # A checkpoint written by an earlier cohort holds its diagrams already.
                if path.name.startswith(BINS_PREFIX) and path.suffix == ".json" and not path.with_suffix(".png").exists():
                    tracker.log_file(reliability_png(path, Path(drawn)), "reliability")


def reliability_png(bins_file: Path, folder: Path) -> Path:
    """The diagram of the bins in ``bins_file`` (``reliability_<peer>.json``), drawn into ``folder``
    under the same name as a PNG, titled with the peer."""
    from cohort.metrics.reliability import BINS_PREFIX, ReliabilityBins, reliability_diagram

    bins = ReliabilityBins.from_dict(json.loads(bins_file.read_text()))
    return reliability_diagram(bins, folder / bins_file.with_suffix(".png").name, title=bins_file.stem[len(BINS_PREFIX):])


def existing_store_client(uri: str, what: str):
    """A client for reading a store that must exist already (never creates an empty one)."""
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise CohortError(f"{what}: no MLflow store at {uri}")
    return MlflowClient(tracking_uri=uri)


MLFLOW_CHECKPOINT = "mlflow:"


def is_mlflow_checkpoint(reference: str | None) -> bool:
    return bool(reference) and (reference.startswith(MLFLOW_CHECKPOINT) or reference.startswith("runs:/"))


RUN_ID = re.compile(r"[0-9a-f]{32}")


def checkpoint_run_id(reference: str, where: str) -> str:
    """The run id of a ``runs:/RUN_ID/PATH`` reference, checked before it names any folder: an
    MLflow run id is 32 hex characters (``runs:/../../etc/x`` is refused)."""
    run_id, _, artifact = reference[len("runs:/"):].partition("/")
    if not RUN_ID.fullmatch(run_id):
        raise CohortError(f"{reference!r}: {run_id!r} is not an MLflow run id (32 hex characters); "
                          "expected runs:/RUN_ID/weights/PEER.pt", where)
    if not artifact or ".." in artifact.split("/"):
        raise CohortError(f"{reference!r}: expected runs:/RUN_ID/weights/PEER.pt", where)
    return run_id


def resolve_checkpoint(reference: str, uri: str, where: str) -> str:
    """``mlflow:EXPERIMENT/PEER`` as the ``runs:/RUN_ID/weights/PEER.pt`` of the experiment's
    latest finished run (so a run records, and a resumed run reloads, exactly those weights);
    a ``runs:/`` reference checked and kept."""
    if reference.startswith(MLFLOW_CHECKPOINT):
        experiment, _, peer = reference[len(MLFLOW_CHECKPOINT):].rpartition("/")
        if not experiment or not peer or peer in (".", ".."):
            raise CohortError(f"{reference!r}: expected mlflow:EXPERIMENT/PEER", where)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
            raise CohortError(f"{reference!r}: no MLflow store at {uri} (train that peer first)", where)
        client = existing_store_client(uri, reference)
        try:
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=1) if found else []
        except Exception as error:  # noqa: BLE001
            raise CohortError(f"{reference!r}: cannot search MLflow at {uri}: {first_line(error)}", where) from None
        if not runs:
            raise CohortError(f"{reference!r}: no finished run of experiment {experiment!r} in {uri} "
                              "(train that peer first)", where)
        reference = f"runs:/{runs[0].info.run_id}/weights/{peer}.pt"
    checkpoint_run_id(reference, where)
    return reference


def fetch_checkpoint(reference: str, uri: str, where: str, folder: str | Path) -> str:
    """A copy, in ``folder``, of a peer's weights logged by an earlier run.

    ``mlflow:EXPERIMENT/PEER`` is ``weights/PEER.pt`` of the experiment's latest finished run;
    ``runs:/RUN_ID/weights/PEER.pt`` is MLflow's own artifact URI.
    """
    _quiet_mlflow()
    import mlflow

    reference = resolve_checkpoint(reference, uri, where)
    target = Path(folder) / checkpoint_run_id(reference, where)
    target.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(target), tracking_uri=uri)
    except Exception as error:  # noqa: BLE001
        raise CohortError(f"{reference!r}: cannot fetch from MLflow at {uri}: {first_line(error)}", where) from None


def logged_topology(client, run_id: str, required: bool = True) -> Topology | None:
    """A cohort run's resolved topology as it logged it, read with the strict loader: the one reader of
    ``topology.yaml`` (evaluate, export, compare, resume). Absent or unreadable: one line when
    ``required``, else None."""
    import tempfile

    from cohort.config.loader import read_yaml
    from cohort.topology import topology_from_dict

    with tempfile.TemporaryDirectory(prefix="cohort-run-") as scratch:
        try:
            if TOPOLOGY_FILE in {Path(item.path).name for item in client.list_artifacts(run_id)}:
                return topology_from_dict(read_yaml(client.download_artifacts(run_id, TOPOLOGY_FILE, scratch)),
                                          TOPOLOGY_FILE)
        except CohortError:
            if required:
                raise
            return None
        except Exception as error:  # noqa: BLE001 - an unreachable artifact store or a broken file: one answer
            if required:
                raise CohortError(f"run {run_id}: cannot read its {TOPOLOGY_FILE} ({first_line(error)})") from None
            return None
    if required:
        raise CohortError(f"run {run_id} has no {TOPOLOGY_FILE}: not a cohort run")
    return None
