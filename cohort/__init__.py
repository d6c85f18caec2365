"""cohort's Python API: what the commands do, for a notebook or a script.

    import cohort
    topology = cohort.load_topology("topologies/three_peers.yaml", overrides={"train.epochs": 3})
    result = cohort.train(topology, tracking_uri="sqlite:///mlflow.db")  # blocks; shows its progress
    result.run_id, result.metrics["student_a/ece"], result.model("student_a")
    cohort.run_study("studies/bdkd_vs_dml_digits.yaml").table("student")     # python -m cohort.study
    cohort.read_study("studies/bdkd_vs_dml_digits.yaml").table("student", "acc")   # --report: no training
    cohort.sweep(topology, "tune_spaces/bdkd.yaml").best_topology  # python -m cohort.tune
    cohort.evaluate_run(result.run_id, shift="fog", severity=3).table()  # python -m cohort.evaluate

Errors are ``cohort.CohortError``, with the one-line message the commands print. Importing cohort
imports nothing heavy: torch, Ray and MLflow load when a function needs them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohort.config.errors import CohortError

if TYPE_CHECKING:
    from cohort.console.display import Display
    from cohort.driver.cluster import RayOptions
    from cohort.driver.training import Trained
    from cohort.evaluation.session import EvaluationResult
    from cohort.studies.session import StudyResult
    from cohort.topology import Topology
    from cohort.tuning.session import SweepResult

__all__ = ["CohortError", "evaluate_run", "load_topology", "read_study", "run_study", "sweep", "train"]


def load_topology(path: str | Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Topology:
    """Read and validate a topology file; ``overrides`` as ``{"train.epochs": 3}`` or ``--set``'s
    ``["train.epochs=3"]``, validated again with them applied."""
    from cohort.topology import load_topology as load

    return load(path, overrides)


def train(topology: Topology, *, tracking_uri: str | None = None, storage: str | None = None,
          address: str | None = None, register: Mapping[str, str] | Iterable[str] = (),
          display: str | Display = "auto", ray: RayOptions | None = None) -> Trained:
    """Train the cohort as ``python -m cohort.run`` does and return its result: ``run_id``,
    ``metrics`` (the final epoch's, e.g. ``"student/acc"``), ``peers``, ``model(peer)`` (the trained
    ``torch.nn.Module``). ``tracking_uri``: the MLflow store (default: the topology's, else
    ``sqlite:///mlflow.db`` here); ``storage``: Ray Train's checkpoints; ``address``: a Ray cluster to
    join ('auto' or HOST:PORT; default: a new Ray on this machine, or the one already running in this
    process); ``register``: {peer: registered model name}; ``display``: 'auto' (a terminal's bar, else
    log lines), 'log', 'json' or 'quiet'."""
    import os
    import time

    from cohort.console.display import make_display
    from cohort.driver.cluster import RayOptions
    from cohort.driver.launch import fetch_checkpoints
    from cohort.driver.startup import asked_at
    from cohort.driver.training import start_run
    from cohort.tracking.logged_models import parse_registrations
    from cohort.tracking.tracker import resolve_uri

    called = time.time()  # the start-up breakdown counts from this call (a command's: from its process's start)
    display = make_display(display)
    items = [f"{peer}={name}" for peer, name in register.items()] if isinstance(register, Mapping) else list(register)
    registrations = parse_registrations(items, topology)
    uri = resolve_uri(tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), uri)
    with asked_at(called):
        return start_run(topology, uri, ray or RayOptions(address=address), storage, registrations, display)


def run_study(path: str | Path, *, overrides: Iterable[str] = (), tracking_uri: str | None = None,
              storage: str | None = None, address: str | None = None, resume: bool = False,
              register: Mapping[str, str] | Iterable[str] = (), allow_single_seed: bool = False,
              out: str | Path | None = None, overwrite: bool = False, format: str = "table",
              display: str | Display = "auto", verbose: bool = False) -> StudyResult:
    """Run the study file ``path`` as ``python -m cohort.study`` does (every arm x seed one cohort
    run, all through one Ray Tune experiment under one parent MLflow run) and return its
    ``StudyResult``: ``name``, ``experiment``, ``parent_run_id``, ``status``, ``tracking_uri``,
    ``outcomes`` (one per run), ``figures`` (the files drawn), ``table(role, metric=None)`` (a
    DataFrame, one row per arm). ``overrides``: ``--set``'s ``["train.epochs=3"]`` for every arm;
    ``storage``: where Tune keeps the study (default ``~/ray_results/cohort-study``); ``resume``:
    continue the interrupted study of this name; ``register``: {role: name} (or ``["role=name"]``),
    the best arm's best run's peer registered; ``out``: the figures' folder (default
    ``study-<name>``; one that holds files only with ``overwrite``); ``format``: how the tables
    print ('table', 'markdown', 'csv', 'latex'); ``display``: as ``train``'s. Every input is
    checked before Ray starts; a study with no finished run raises ``CohortError``."""
    from cohort.console.display import make_display
    from cohort.studies.session import execute, prepare_all
    from cohort.studies.tables import FORMATS

    display = make_display(display)
    check_choice("format", format, FORMATS)
    prepared = prepare_all(path, overrides, tracking_uri, allow_single_seed, register, out, overwrite)
    return execute(prepared, path, storage=storage, address=address, resume=resume, verbose=verbose, fmt=format,
                   display=display)


def read_study(path: str | Path, *, overrides: Iterable[str] = (), tracking_uri: str | None = None,
               register: Mapping[str, str] | Iterable[str] = (), allow_single_seed: bool = False,
               out: str | Path | None = None, overwrite: bool = False, format: str = "table",
               display: str | Display = "quiet") -> StudyResult:
    """Read a finished, running or interrupted study back from MLflow without training, as
    ``python -m cohort.study --report`` does: the tables (shown in ``display``; 'quiet' prints
    them only), the figures drawn into ``out`` (default ``study-<name>``; a folder that holds
    files only with ``overwrite``), the ``register`` ones registered; its ``StudyResult``.
    ``path`` and ``overrides`` name the study as it was run."""
    from cohort.console.display import make_display
    from cohort.studies.session import prepare_all, report
    from cohort.studies.tables import FORMATS

    display = make_display(display)
    check_choice("format", format, FORMATS)
    prepared = prepare_all(path, overrides, tracking_uri, allow_single_seed, register, out, overwrite,
                           load_weights=False)
    return report(prepared, format, display)


def sweep(topology: Topology, space: str | Path, *, num_samples: int | None = None, name: str | None = None,
          resume: bool = False, tracking_uri: str | None = None, storage: str | None = None,
          address: str | None = None, out: str | Path = ".", overwrite: bool = False,
          display: str | Display = "auto", verbose: bool = False) -> SweepResult:
    """Search ``topology``'s values over the space file ``space`` as ``python -m cohort.tune`` does
    (every trial one cohort, through Ray Tune, under one parent MLflow run) and return its
    ``SweepResult``: ``name``, ``parent_run_id``, ``best_trial``, ``best_value``, ``best_config``,
    ``best_topology``, ``best_file`` (``out/best_<name>.yaml``, replaced only with ``overwrite``),
    ``table()`` (the trials ranked). ``num_samples``: default the space file's; ``name``: default
    ``<topology name>-<space file name>``; ``resume``: continue the interrupted sweep of this name;
    ``storage``: where Tune keeps it (default ``~/ray_results/cohort-tune``); the rest as ``train``'s.
    A sweep in which no trial finished raises ``CohortError``."""
    from cohort.console.display import make_display
    from cohort.tuning.session import sweep

    return sweep(topology, space, num_samples=num_samples, name=name, resume=resume, tracking_uri=tracking_uri,
                 storage=storage, address=address, out=out, overwrite=overwrite, verbose=verbose,
                 display=make_display(display))


def evaluate_run(run_id: str, *, tracking_uri: str | None = None, data: str | Path | None = None,
                 overrides: Iterable[str] = (), shift: str | Iterable[str] | None = None,
                 severity: str | int | Iterable[int] | None = None, peer: str | None = None,
                 out: str | Path | None = None, overwrite: bool = False, format: str = "table",
                 display: str | Display = "quiet") -> EvaluationResult:
    """Evaluate a finished run's peers and ensemble without training, as ``python -m cohort.evaluate``
    does, and return its ``EvaluationResult``: ``rows``, ``table()`` (a DataFrame: data, severity,
    peer, the metrics before and after the run's temperatures), ``logged_under`` and ``figure``.
    ``data``: a topology file whose data section replaces the run's; ``overrides``: ``["data.root=..."]``;
    ``shift``: corruptions ('all', 'fog,snow' or a list) at ``severity`` ('1-5' by default, 3, '1,3'
    or a list): their results are logged into the run under ``shift/...`` and drawn into ``out``
    (default ``evaluate-<run id prefix>``; an earlier figure there replaced only with ``overwrite``);
    ``peer``: only that peer's rows (or 'ensemble'); ``display``: 'quiet' shows the table only."""
    from cohort.console.display import make_display
    from cohort.evaluation.session import FORMATS, as_text, evaluate_run

    display = make_display(display)
    check_choice("format", format, FORMATS)
    return evaluate_run(run_id, tracking_uri=tracking_uri, data=data, overrides=overrides, shift=as_text(shift),
                        severity=as_text(severity), peer=peer, out=out, overwrite=overwrite, fmt=format,
                        display=display)


def check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise CohortError(f"{what} {value!r}: one of {', '.join(choices)}")
