"""One session of a study (the library of ``python -m cohort.study`` and ``cohort.run_study``): the
study prepared and checked before Ray starts, its plan, its runs through Ray Tune under one parent
MLflow run (started, or resumed), and at the end the tables and figures; or, without training, the
tables and figures of a finished, running or interrupted study read back from MLflow.

The result is a :class:`StudyResult`: the parent run, the runs' outcomes, the figures written, and
each role's table as a ``pandas.DataFrame``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohort.config.errors import CohortError
from cohort.console.display import Display, lasting_mode
from cohort.studies.tables import FORMATS, Outcome, RoleTable

if TYPE_CHECKING:
    import pandas

    from cohort.studies.file import Study
    from cohort.tracking.tracker import Tracker

DEFAULT_STORAGE = "~/ray_results/cohort-study"


@dataclass(frozen=True)
class StudyResult:
    """A study as MLflow holds it: its parent run and status, every (arm, seed) run's outcome, the
    figures written, and one table per role (``table(role)``)."""

    name: str
    experiment: str
    parent_run_id: str
    status: str  # the parent run's: FINISHED, or RUNNING / KILLED / FAILED for a study read unfinished
    tracking_uri: str
    outcomes: tuple[Outcome, ...]  # one per (arm, seed) run: arm, seed, status, final metrics, run_id, error
    figures: tuple[Path, ...]
    tables: tuple[RoleTable, ...]  # one per role, as the printed tables show them

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(table.role for table in self.tables)

    def table(self, role: str, metric: str | None = None) -> pandas.DataFrame:
        """The role's table, one row per arm (index ``arm``): ``peer``, ``n`` (runs finished),
        ``failed``, and per metric its ``mean`` and ``std`` over seeds and the paired difference to
        the baseline arm (``pairs``, ``difference``, ``ci_low``, ``ci_high``: its 95% Student-t
        interval, ``p_value``: the paired t-test; NaN for the baseline itself). Values as logged
        (accuracy as a fraction, not in %). With ``metric`` the columns are named by the statistic
        alone; without, ``<metric>_<statistic>`` for every metric of the study."""
        import pandas

        chosen = next((table for table in self.tables if table.role == role), None)
        if chosen is None:
            raise CohortError(f"role {role!r}: the study's roles are {', '.join(self.roles)}")
        if metric is not None and metric not in chosen.metrics:
            raise CohortError(f"metric {metric!r}: the study's metrics are {', '.join(chosen.metrics)}")
        metrics = [metric] if metric is not None else chosen.metrics
        records = []
        for row in chosen.rows:
            record: dict[str, Any] = {"arm": row.arm, "peer": row.peer, "n": row.n, "failed": row.failed}
            for name in metrics:
                summary = row.summaries[name]
                diff = row.differences[name] if row.differences else None
                values = {"mean": summary.mean, "std": summary.std, "pairs": diff.n_pairs if diff else 0,
                          "difference": diff.mean if diff else math.nan, "ci_low": diff.ci_low if diff else math.nan,
                          "ci_high": diff.ci_high if diff else math.nan,
                          "p_value": diff.p_value if diff else math.nan}
                record.update(values if metric is not None else {f"{name}_{key}": value for key, value in values.items()})
            records.append(record)
        return pandas.DataFrame.from_records(records).set_index("arm")


@dataclass(frozen=True)
class Prepared:
    """A study checked before anything starts: every arm validated with its checkpoints pinned, the
    tracking URI, the checkpoints' weights per arm, the registrations and the figures' folder."""

    study: Study
    tracking_uri: str
    weights: dict[str, Any]
    registrations: dict[str, str]
    out: Path


def prepare(path: str | Path, overrides: Iterable[str] = (), tracking_uri: str | None = None,
            allow_single_seed: bool = False, load_weights: bool = True):
    """The study with every arm validated and its checkpoints pinned, the tracking URI, and the
    checkpoints' weights per arm: all checked before Ray starts."""
    from cohort.datasets import describe_dataset
    from cohort.driver.launch import fetch_checkpoints, load_checkpoints
    from cohort.studies.file import (
        Arm,
        Study,
        check_metrics,
        load_study,
        reported_metrics,
    )
    from cohort.tracking.tracker import resolve_uri
    from cohort.worker.report import report_keys

    study = load_study(path, list(overrides), allow_single_seed)
    tracking_uri = resolve_uri(tracking_uri)
    arms, reported, weights = {}, {}, {}
    for name, arm in study.arms.items():
        try:
            topology = fetch_checkpoints(arm.topology.with_absolute_paths(os.getcwd()), tracking_uri)
            reported[name] = reported_metrics(arm, report_keys(topology, describe_dataset(topology.data)))
            if load_weights:
                weights[name] = load_checkpoints(topology, tracking_uri)
        except CohortError as error:
            located = f"{error.where}: " if error.where else ""
            raise CohortError(f"arms.{name}: {located}{error.message}", study.path.name) from None
        arms[name] = Arm(arm.name, arm.path, topology, arm.roles, arm.differences)
    study = Study(study.path, study.config, arms)
    check_metrics(study, reported)
    return study, tracking_uri, weights


def prepare_all(path: str | Path, overrides: Iterable[str] = (), tracking_uri: str | None = None,
                allow_single_seed: bool = False, register: Mapping[str, str] | Iterable[str] = (),
                out: str | Path | None = None, overwrite: bool = False, load_weights: bool = True) -> Prepared:
    """``prepare``, the registrations (``ROLE=NAME`` or {role: name}) and the figures' folder: every
    check a run or a report makes before it starts anything."""
    # Reading a study's artifacts back should not draw download bars between the lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    study, uri, weights = prepare(path, overrides, tracking_uri, allow_single_seed, load_weights)
    items = [f"{role}={name}" for role, name in register.items()] if isinstance(register, Mapping) else list(register)
    found = registrations(items, study)
    return Prepared(study, uri, weights, found, check_figures_folder(out, overwrite, study))


# --------------------------------------------------------------------------- the plan


def resources_per_run(study) -> tuple[int, float]:
    """The most workers and GPUs one run of the study takes."""
    workers = max(arm.topology.num_workers for arm in study.arms.values())
    gpus = max(arm.topology.num_workers * arm.topology.resources.gpus_per_worker for arm in study.arms.values())
    return workers, gpus


def plan_concurrency(study, cpus: float, gpus: float) -> tuple[int, float]:
    """How many runs at once, and each worker's CPUs (``cohort.tuning.sweep.plan_resources``; the arms'
    own ``resources.cpus_per_peer`` where they set one), no more runs at once than the GPUs hold."""
    from cohort.tuning.sweep import plan_resources

    workers, gpus_per_run = resources_per_run(study)
    asked = [arm.topology.resources.cpus_per_peer for arm in study.arms.values()
             if arm.topology.resources.cpus_per_peer is not None]
    concurrent, cpus_per_peer = plan_resources(workers, len(study.runs()), cpus, study.config.max_concurrent,
                                               max(asked) if asked else None)
    if gpus_per_run:
        if gpus + 1e-9 < gpus_per_run:
            raise CohortError(f"one run needs {gpus_per_run:g} GPUs, the Ray cluster has {gpus:g}")
        concurrent = min(concurrent, int((gpus + 1e-9) // gpus_per_run))
    return concurrent, cpus_per_peer


def describe_plan(study, tracking_uri: str, cpus: float, gpus: float) -> str:
    from cohort.config.loader import dump_yaml

    runs = len(study.runs())
    lines = [f"study {study.name}: {len(study.arms)} arms x {len(study.seeds)} seeds "
             f"({', '.join(map(str, study.seeds))}) = {runs} runs; baseline {study.baseline}",
             f"metrics: {', '.join(study.metrics)}; roles: {', '.join(study.roles)}"]
    for arm in study.arms.values():
        topology = arm.topology
        peers = ", ".join(f"{peer} {topology.peers[peer].model}" + (" (frozen)" if topology.peers[peer].frozen else "")
                          for peer in topology.peer_names)
        roles = ", ".join(f"{role}={peer}" for role, peer in arm.roles.items())
        lines.append(f"\narm {arm.name}: {arm.path.name}, {topology.train.epochs} epoch{'s' if topology.train.epochs > 1 else ''}; "
                     f"peers {peers}; roles {roles}")
        if arm.differences:
            lines += ["  " + line for line in dump_yaml({"set": arm.differences}).splitlines()]
    workers, gpus_per_run = resources_per_run(study)
    gpu_text = f" and {gpus_per_run:g} GPUs" if gpus_per_run else ""
    try:
        concurrent, cpus_per_peer = plan_concurrency(study, cpus, gpus)
        lines.append(f"\nresources: each run takes up to {workers} workers x {cpus_per_peer:g} CPU{gpu_text}; "
                     f"{concurrent} run(s) at a time on {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else ""))
    except CohortError as error:
        lines.append(f"\nresources: each run takes up to {workers} workers{gpu_text}; not on this machine "
                     f"({error.message}): join a cluster with --address")
    lines.append(f"MLflow: experiment {study.experiment!r} at {tracking_uri}: one parent run, {runs} child runs")
    return "\n".join(lines)


def plan_text(path: str | Path, overrides: Iterable[str] = (), tracking_uri: str | None = None,
              allow_single_seed: bool = False, register: Mapping[str, str] | Iterable[str] = ()) -> str:
    """``--dry-run``: the study checked (its registrations too) and its plan on this machine; nothing starts."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    study, uri, _ = prepare(path, overrides, tracking_uri, allow_single_seed, load_weights=False)
    registrations(list(register), study)
    return describe_plan(study, uri, float(os.cpu_count() or 1), 0.0)


# --------------------------------------------------------------------------- the result


def result_tables(client, study, parent):
    """One table per role from the study's runs in MLflow, and the runs."""
    from cohort.studies.results import outcomes
    from cohort.studies.tables import build_tables

    found = outcomes(client, parent)
    return build_tables({name: arm.roles for name, arm in study.arms.items()}, study.baseline, study.metrics, found), found


def tables_text(study, tables, found, fmt: str) -> str:
    """The tables in ``fmt``, and (but in csv) one line per failed run."""
    from cohort.studies.tables import failures, render

    lines = failures(found) if fmt != "csv" else []
    return render(tables, fmt, len(study.seeds)) + ("\n\n" + "\n".join(lines) if lines else "")


def draw(client, study, tables, found, out: Path) -> list[Path]:
    from cohort.studies.figures import draw_all
    from cohort.studies.results import pooled_bins

    def pooled(arm: str, peer: str):
        return pooled_bins(client, [outcome for outcome in found if outcome.arm == arm], peer)

    return draw_all(tables, found, study.metrics, pooled, out)


def figures_folder(out: str | Path | None, study) -> Path:
    return Path(out or f"study-{study.name}")


def check_figures_folder(out: str | Path | None, overwrite: bool, study) -> Path:
    """The figures' folder, checked before anything starts (``cohort.console.outputs``)."""
    from cohort.console.outputs import check_output_folder

    check_output_folder(figures_folder(out, study), "--out", overwrite)
    return figures_folder(out, study)


def report(prepared: Prepared, fmt: str = "table", display: Display | None = None) -> StudyResult:
    """Tables and figures from MLflow, for a finished, running or interrupted study."""
    from cohort.comparison.queries import connect
    from cohort.studies.results import find_parent

    study, tracking_uri = prepared.study, prepared.tracking_uri
    client = connect(tracking_uri)
    parent = find_parent(client, study.experiment, study.name)
    if parent is None:
        raise CohortError(f"--report: no study named {study.name!r} in experiment {study.experiment!r} at "
                          f"{tracking_uri} (run it first, or pass --tracking-uri)")
    display = display or Display("log")
    tables, found = result_tables(client, study, parent)
    text = tables_text(study, tables, found, fmt)
    done = sum(outcome.status in ("FINISHED", "FAILED") for outcome in found)
    if fmt not in ("csv", "latex"):
        display.summary(f"study {study.name} (MLflow run {parent.info.run_id}, {parent.info.status}): {done} of "
                        f"{len(study.runs())} runs done\n")
    display.summary(text)
    written = draw(client, study, tables, found, prepared.out)
    if fmt not in ("csv", "latex"):
        display.summary(f"\nfigures: {', '.join(str(path) for path in written)}")
    display.json("report", study=study.name, parent_run_id=parent.info.run_id, status=parent.info.status,
                 done=done, runs=len(study.runs()), figures=[str(path) for path in written])
    register_best(client, study, found, prepared.registrations, tracking_uri, display)
    return StudyResult(study.name, study.experiment, parent.info.run_id, parent.info.status, tracking_uri,
                       tuple(found), tuple(written), tuple(tables))


# --------------------------------------------------------------------------- registering the best


def registrations(values: list[str], study) -> dict[str, str]:
    """``--register ROLE=NAME``: {role: registered name}, checked before anything starts."""
    from cohort.tracking.logged_models import check_registered_name

    found = {}
    for value in values:
        role, sep, name = value.partition("=")
        if not sep or not role.strip():
            raise CohortError(f"--register {value!r}: expected ROLE=NAME, e.g. student=digits-student")
        if role not in study.roles:
            raise CohortError(f"--register {value!r}: {role!r} is not a role of the study (roles: "
                              f"{', '.join(study.roles)})")
        found[role] = check_registered_name(name, "--register")
    return found


def best_run(study, found, role: str):
    """The role's arm with the best mean top-1 over its finished runs, and that arm's best run:
    (arm, peer, outcome), or None when no run of the role finished."""
    from cohort.studies.stats import summarize
    from cohort.studies.tables import role_values

    best = None
    for name, arm in study.arms.items():
        peer = arm.roles.get(role)
        if peer is None:
            continue
        values = role_values(found, name, peer, "acc")
        mean = summarize(values.values()).mean
        if values and (best is None or mean > best[0]):
            seed = max(values, key=values.get)
            outcome = next(o for o in found if o.arm == name and o.seed == seed and o.status == "FINISHED")
            best = (mean, name, peer, outcome)
    return None if best is None else best[1:]


def register_best(client, study, found, register: dict[str, str], tracking_uri: str, display: Display) -> None:
    from cohort.tracking.logged_models import register_finished_peer

    for role, name in register.items():
        chosen = best_run(study, found, role)
        if chosen is None:
            raise CohortError(f"--register {role}={name}: no finished run of the study has the role {role!r}")
        arm, peer, outcome = chosen
        display.summary(f"\n{role}: best arm {arm} (mean top-1), its best run {arm}/seed-{outcome.seed} ({outcome.run_id})")
        registration = register_finished_peer(client, tracking_uri, outcome.run_id, peer, name)
        for line in registration.lines:
            display.summary(line)
        display.json("registered", role=role, arm=arm, seed=outcome.seed, **registration.fields())


# --------------------------------------------------------------------------- running it


def execute(prepared: Prepared, path: str | Path, storage: str | None = None, address: str | None = None,
            resume: bool = False, verbose: bool = False, fmt: str = "table",
            display: Display | None = None) -> StudyResult:
    """The study's runs through Ray Tune (started, or resumed with ``resume``), then its tables and
    figures; the parent run ends FINISHED, or (however this stops early) not RUNNING."""
    from cohort.driver.cluster import start_ray
    from cohort.studies.experiment import STUDY_TAG, end_stopped
    from cohort.tracking.tracker import Tracker

    study, tracking_uri = prepared.study, prepared.tracking_uri
    display = display or Display("log")
    storage = os.path.abspath(os.path.expanduser(storage or DEFAULT_STORAGE))
    study_dir = Path(storage) / study.name
    state_file = Path(storage) / f"{study.name}.cohort.json"
    children_file = Path(storage) / f"{study.name}.children.json"
    existing = existing_parent(tracking_uri, study)  # read only: a refused command creates no store, no experiment
    if not resume and (existing is not None or study_dir.exists()):
        raise CohortError(f"a study named {study.name!r} exists (MLflow experiment {study.experiment!r} or "
                          f"{storage}): --resume it, or rename the study")
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
    if resume and (existing is None or state.get("parent_run_id") != existing.info.run_id):
        raise CohortError(f"--resume: no interrupted study named {study.name!r} in {storage}")
    store = Tracker(tracking_uri, study.experiment)

    cluster = start_ray(address, verbose, dashboard=True)
    concurrent, cpus_per_peer = plan_concurrency(study, float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0)))
    import ray.tune

    if resume and not ray.tune.Tuner.can_restore(str(study_dir)):
        raise CohortError(f"--resume: the study's Tune state in {study_dir} is gone")
    previous = existing.info.status if existing is not None else None
    parent = store.for_run(existing.info.run_id) if existing is not None else None
    try:
        # From here on the parent run is RUNNING: however the command ends, it does not stay so.
        if parent is None:
            parent = store.for_run(store.client.create_run(
                store.experiment_id, run_name=f"study-{study.name}",
                tags={STUDY_TAG: study.name, "cohort.study.parent": "true"}).info.run_id)
            describe_parent(parent, study, state_file)
        else:
            parent.client.update_run(parent.run_id, status="RUNNING")
        return train(prepared, path, parent, existing, storage, children_file, concurrent, cpus_per_peer, resume,
                     fmt, display)
    except BaseException as error:
        end_stopped(store.client, parent.run_id if parent is not None else None, children_file,
                    stopped_status(error, previous))
        raise


def existing_parent(tracking_uri: str, study):
    """The study's parent run in the store, or None; reading only (a missing SQLite file stays missing)."""
    from cohort.config.errors import first_line
    from cohort.studies.results import find_parent
    from cohort.tracking.tracker import existing_store_client

    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix):]).is_file():
        return None
    try:
        return find_parent(existing_store_client(tracking_uri, "--tracking-uri"), study.experiment, study.name)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is not usable
        raise CohortError(f"MLflow tracking store {tracking_uri!r} is not usable: {first_line(error)}",
                          "tracking.uri") from None


def stopped_status(error: BaseException, previous: str | None) -> str:
    """The parent run's status when the command stops on ``error`` with the parent RUNNING: FINISHED
    again for a study that had finished before (a --resume that found nothing to do), KILLED on
    Ctrl-C, else FAILED."""
    if previous == "FINISHED":
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def train(prepared: Prepared, path: str | Path, parent: Tracker, existing, storage: str, children_file: Path,
          concurrent: int, cpus_per_peer: float, resume: bool, fmt: str, display: Display) -> StudyResult:
    """The study's runs through Ray Tune (started, or resumed), then the tables and figures."""
    import ray.tune

    from cohort.driver.cluster import started_here
    from cohort.driver.reclaim import Reclaimer
    from cohort.studies.experiment import (
        StudyCallback,
        end_stopped,
        grid,
        objective_key,
        run_datasets,
        study_trial,
    )
    from cohort.studies.results import outcomes
    from cohort.tuning.callbacks import ReclaimCallback
    from cohort.tuning.sweep import TRIAL_CPU, unfinished_trials

    study, tracking_uri, weights = prepared.study, prepared.tracking_uri, prepared.weights
    study_dir = Path(storage) / study.name
    runs = study.runs()
    objectives = {name: objective_key(arm.roles) for name, arm in study.arms.items()}
    arms = {name: arm.topology.to_dict() for name, arm in study.arms.items()}
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(study_trial, arms=arms, objectives=objectives, cpus_per_peer=cpus_per_peer,
                                 threads=max(1, int(cpus_per_peer)), storage=str(Path(storage) / f"{study.name}-trainers"),
                                 weights=weights, resource_requests=not started_here(),
                                 datasets=run_datasets(arms, runs)),
        {"CPU": TRIAL_CPU})
    already = sum(o.status in ("FINISHED", "FAILED") for o in outcomes(parent.client, existing)) if existing else 0
    callback = StudyCallback(tracking_uri, study.experiment, parent.run_id, study.name, arms,
                             {name: arm.roles for name, arm in study.arms.items()}, len(runs),
                             children_file, already_done=already, display=lasting_mode(display.mode))
    display.info(f"study {study.name}: {len(runs)} runs ({len(study.arms)} arms x {len(study.seeds)} seeds), "
                 f"{concurrent} at a time ({cpus_per_peer:g} CPU per worker)" + (f", {already} done before" if already else "")
                 + f"\nMLflow parent run {parent.run_id} (experiment {study.experiment!r})")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own lines replace Tune's status tables
    # Before any run: the placement groups already there are not the study's to remove.
    reclaimer = Reclaimer()
    if resume:
        tuner = ray.tune.Tuner.restore(str(study_dir), trainable=trainable, param_space=grid(runs),
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=grid(runs),
            run_config=ray.tune.RunConfig(name=study.name, storage_path=storage, verbose=0,
                                          callbacks=[callback, ReclaimCallback(reclaimer)],
                                          failure_config=ray.tune.FailureConfig(max_failures=0),
                                          checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1)),
            # Every run trains to its end: the next run takes its process (cohort.tuning.sweep.reuses_trial_processes).
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True))
    started = time.perf_counter()
    try:
        tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted: continue with python -m cohort.study {path} --resume", file=sys.stderr)
        raise
    finally:
        reclaimer.settle()  # the CPUs of the runs Tune stopped last, for what this driver runs next
    unfinished = unfinished_trials(study_dir, len(runs))
    if unfinished:
        # Tune catches Ctrl-C itself and returns what it had: the study is not over; its running
        # children are KILLED, as its parent.
        end_stopped(parent.client, parent.run_id, children_file, "KILLED")
        raise CohortError(f"study {study.name} interrupted with {unfinished} run(s) unfinished: continue with "
                          f"python -m cohort.study {path} --resume")
    display.summary(f"\nstudy {study.name} done in {time.perf_counter() - started:.0f}s\n")
    return finish(prepared, parent, fmt, display)


def describe_parent(parent: Tracker, study, state_file: Path) -> None:
    """What the study's new parent run holds from the start; its id in the study's state file."""
    parent.log_params({"study.seeds": ",".join(map(str, study.seeds)), "study.baseline": study.baseline,
                       "study.arms": ",".join(study.arms), "study.metrics": ",".join(study.metrics)})
    parent.log_text(study.path.read_text(), "study.yaml")
    for arm in study.arms.values():
        parent.log_text(arm.topology.to_yaml(), f"arms/{arm.name}.yaml")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": parent.run_id}))


def finish(prepared: Prepared, parent: Tracker, fmt: str = "table", display: Display | None = None) -> StudyResult:
    """The tables printed and, with the figures, logged to the parent run; the parent ended."""
    from cohort.studies.results import find_parent

    study, tracking_uri = prepared.study, prepared.tracking_uri
    found_parent = find_parent(parent.client, study.experiment, study.name)
    display = display or Display("log")
    tables, found = result_tables(parent.client, study, found_parent)
    display.summary(tables_text(study, tables, found, fmt))
    out = prepared.out
    written = draw(parent.client, study, tables, found, out)
    for name in FORMATS:
        parent.log_text(tables_text(study, tables, found, name), f"tables/{fmt_file(name)}")
    for figure in written:
        parent.log_file(figure, "figures")
    finished = sum(outcome.status == "FINISHED" for outcome in found)
    status = "FINISHED" if finished else "FAILED"
    parent.finish(status)
    display.summary(f"\nfigures: {out}/ ({len(written)} files); MLflow parent run {parent.run_id} at {tracking_uri}")
    display.json("done", study=study.name, parent_run_id=parent.run_id, finished=finished, runs=len(found),
                 figures=str(out))
    if not finished:
        raise CohortError("no run of the study finished: see the reasons above")
    register_best(parent.client, study, found, prepared.registrations, tracking_uri, display)
    return StudyResult(study.name, study.experiment, parent.run_id, status, tracking_uri, tuple(found),
                       tuple(written), tuple(tables))


def fmt_file(fmt: str) -> str:
    return {"table": "tables.txt", "markdown": "tables.md", "csv": "tables.csv", "latex": "tables.tex"}[fmt]
