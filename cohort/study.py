"""``python -m cohort.study STUDY.yaml``: compare methods over seeds, with the statistics papers report.

A study crosses arms (methods, each a topology) with seeds. Every (arm, seed) is one whole cohort
run, and all of them run as one Ray Tune experiment (a FIFO grid), so they fill a cluster; MLflow
holds a parent run for the study and one child per (arm, seed). At the end: one table per role
(mean ± std over seeds, and each arm's paired difference to the baseline with its 95% interval
and paired t-test), and figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError
from cohort.console.command import run_command
from cohort.console.display import Display, add_display_options, mode_of, saved_mode
from cohort.studies.tables import FORMATS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study YAML file (see studies/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a topology value in every arm, after the study's own sets (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--report", action="store_true",
                        help="print the tables and draw the figures from MLflow, without training")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study of this name")
    parser.add_argument("--format", choices=FORMATS, default="table", help="how the tables print (default: table)")
    parser.add_argument("--out", help="folder for the figures (default: study-<name> in the working directory); "
                                      "one that holds files (an earlier report's) only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="write the figures into an --out folder that holds "
                                                                 "files (default: refuse, before anything starts)")
    parser.add_argument("--register", action="append", default=[], metavar="ROLE=NAME",
                        help="at the end (or with --report), register the role's peer of the best arm's best run in "
                             "the MLflow Model Registry under NAME (repeatable)")
    parser.add_argument("--allow-single-seed", action="store_true",
                        help="run a study of one seed (no standard deviations, no intervals)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start Ray here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="where Tune keeps the study (default: ~/ray_results/cohort-study)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    add_display_options(parser)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, load_weights: bool):
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

    study = load_study(args.study, args.overrides, args.allow_single_seed)
    tracking_uri = resolve_uri(args.tracking_uri)
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
        lines.append(f"\narm {arm.name}: {arm.path.name}, {topology.train.epochs} epochs; peers {peers}; roles {roles}")
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


def figures_folder(args: argparse.Namespace, study) -> Path:
    return Path(args.out or f"study-{study.name}")


def check_figures_folder(args: argparse.Namespace, study) -> Path:
    """The figures' folder, checked before anything starts (``cohort.console.outputs``)."""
    from cohort.console.outputs import check_output_folder

    return check_output_folder(figures_folder(args, study), "--out", args.overwrite)


def report(args: argparse.Namespace, study, tracking_uri: str) -> int:
    """Tables and figures from MLflow, for a finished, running or interrupted study."""
    from cohort.comparison.queries import connect
    from cohort.studies.results import find_parent

    client = connect(tracking_uri)
    parent = find_parent(client, study.experiment, study.name)
    if parent is None:
        raise CohortError(f"--report: no study named {study.name!r} in experiment {study.experiment!r} at "
                          f"{tracking_uri} (run it first, or pass --tracking-uri)")
    display = Display(mode_of(args))
    tables, found = result_tables(client, study, parent)
    text = tables_text(study, tables, found, args.format)
    done = sum(outcome.status in ("FINISHED", "FAILED") for outcome in found)
    if args.format not in ("csv", "latex"):
        display.summary(f"study {study.name} (MLflow run {parent.info.run_id}, {parent.info.status}): {done} of "
                        f"{len(study.runs())} runs done\n")
    display.summary(text)
    written = draw(client, study, tables, found, figures_folder(args, study))
    if args.format not in ("csv", "latex"):
        display.summary(f"\nfigures: {', '.join(str(path) for path in written)}")
    display.json("report", study=study.name, parent_run_id=parent.info.run_id, status=parent.info.status,
                 done=done, runs=len(study.runs()), figures=[str(path) for path in written])
    register_best(client, study, found, args.registrations, tracking_uri, display)
    return 0


# --------------------------------------------------------------------------- running it


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


def run(args: argparse.Namespace) -> int:
    # Reading a study's artifacts back should not draw download bars between the lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.report and (args.dry_run or args.resume):
        raise CohortError("--report reads MLflow only: give it without --dry-run or --resume")
    study, tracking_uri, weights = prepare(args, load_weights=not (args.dry_run or args.report))
    args.registrations = registrations(args.register, study)
    if not args.dry_run:
        check_figures_folder(args, study)
    if args.report:
        return report(args, study, tracking_uri)
    if args.dry_run:
        print(describe_plan(study, tracking_uri, float(os.cpu_count() or 1), 0.0))
        return 0
    return execute(args, study, tracking_uri, weights)


def execute(args: argparse.Namespace, study, tracking_uri: str, weights: dict[str, Any]) -> int:
    from cohort.driver.cluster import start_ray
    from cohort.studies.experiment import (
        end_stopped,
    )
    from cohort.tracking.tracker import Tracker

    storage = os.path.abspath(os.path.expanduser(args.storage or "~/ray_results/cohort-study"))
    study_dir = Path(storage) / study.name
    state_file = Path(storage) / f"{study.name}.cohort.json"
    children_file = Path(storage) / f"{study.name}.children.json"
    existing = existing_parent(tracking_uri, study)  # read only: a refused command creates no store, no experiment
    if not args.resume and (existing is not None or study_dir.exists()):
        raise CohortError(f"a study named {study.name!r} exists (MLflow experiment {study.experiment!r} or "
                          f"{storage}): --resume it, or rename the study")
    state = json.loads(state_file.read_text()) if args.resume and state_file.exists() else {}
    if args.resume and (existing is None or state.get("parent_run_id") != existing.info.run_id):
        raise CohortError(f"--resume: no interrupted study named {study.name!r} in {storage}")
    tracker = Tracker(tracking_uri, study.experiment)

    cluster = start_ray(args.address, args.verbose, dashboard=True)
    concurrent, cpus_per_peer = plan_concurrency(study, float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0)))
    import ray.tune

    if args.resume and not ray.tune.Tuner.can_restore(str(study_dir)):
        raise CohortError(f"--resume: the study's Tune state in {study_dir} is gone")
    previous = existing.info.status if existing is not None else None
    tracker.run_id = existing.info.run_id if existing is not None else None
    try:
        # From here on the parent run is RUNNING: however the command ends, it does not stay so.
        if existing is None:
            parent_run_id = start_parent(tracker, study, state_file)
        else:
            parent_run_id = existing.info.run_id
            tracker.client.update_run(parent_run_id, status="RUNNING")
        return train(args, study, tracking_uri, weights, tracker, existing, parent_run_id, storage, children_file,
                     concurrent, cpus_per_peer)
    except BaseException as error:
        end_stopped(tracker.client, tracker.run_id, children_file, stopped_status(error, previous))
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


def train(args: argparse.Namespace, study, tracking_uri: str, weights: dict[str, Any], tracker, existing,
          parent_run_id: str, storage: str, children_file: Path, concurrent: int, cpus_per_peer: float) -> int:
    """The study's runs through Ray Tune (started, or resumed), then the tables and figures."""
    import ray.tune

    from cohort.studies.experiment import (
        StudyCallback,
        end_stopped,
        grid,
        objective_key,
        study_trial,
    )
    from cohort.studies.results import outcomes
    from cohort.tuning.sweep import TRIAL_CPU, unfinished_trials

    study_dir = Path(storage) / study.name
    runs = study.runs()
    objectives = {name: objective_key(arm.roles) for name, arm in study.arms.items()}
    arms = {name: arm.topology.to_dict() for name, arm in study.arms.items()}
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(study_trial, arms=arms, objectives=objectives, cpus_per_peer=cpus_per_peer,
                                 threads=max(1, int(cpus_per_peer)), storage=str(Path(storage) / f"{study.name}-trainers"),
                                 weights=weights),
        {"CPU": TRIAL_CPU})
    already = sum(o.status in ("FINISHED", "FAILED") for o in outcomes(tracker.client, existing)) if existing else 0
    callback = StudyCallback(tracking_uri, study.experiment, parent_run_id, study.name, arms,
                             {name: arm.roles for name, arm in study.arms.items()}, len(runs),
                             children_file, already_done=already, display=saved_mode(args))
    display = Display(mode_of(args))
    display.info(f"study {study.name}: {len(runs)} runs ({len(study.arms)} arms x {len(study.seeds)} seeds), "
          f"{concurrent} at a time ({cpus_per_peer:g} CPU per worker)" + (f", {already} done before" if already else "")
          + f"\nMLflow parent run {parent_run_id} (experiment {study.experiment!r})")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own lines replace Tune's status tables
    if args.resume:
        tuner = ray.tune.Tuner.restore(str(study_dir), trainable=trainable, param_space=grid(runs),
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=grid(runs),
            run_config=ray.tune.RunConfig(name=study.name, storage_path=storage, callbacks=[callback], verbose=0,
                                          failure_config=ray.tune.FailureConfig(max_failures=0),
                                          checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1)),
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent))
    started = time.perf_counter()
    try:
        tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted: continue with python -m cohort.study {args.study} --resume", file=sys.stderr)
        raise
    unfinished = unfinished_trials(study_dir, len(runs))
    tracker.run_id = parent_run_id
    if unfinished:
        # Tune catches Ctrl-C itself and returns what it had: the study is not over; its running
        # children are KILLED, as its parent.
        end_stopped(tracker.client, parent_run_id, children_file, "KILLED")
        raise CohortError(f"study {study.name} interrupted with {unfinished} run(s) unfinished: continue with "
                          f"python -m cohort.study {args.study} --resume")
    display.summary(f"\nstudy {study.name} done in {time.perf_counter() - started:.0f}s\n")
    return finish(args, tracker, study, parent_run_id, tracking_uri, display)


def start_parent(tracker, study, state_file: Path) -> str:
    from cohort.studies.experiment import STUDY_TAG

    run = tracker.client.create_run(tracker.experiment_id, run_name=f"study-{study.name}",
                                    tags={STUDY_TAG: study.name, "cohort.study.parent": "true"})
    tracker.run_id = run.info.run_id
    tracker.log_params({"study.seeds": ",".join(map(str, study.seeds)), "study.baseline": study.baseline,
                        "study.arms": ",".join(study.arms), "study.metrics": ",".join(study.metrics)})
    tracker.log_text(study.path.read_text(), "study.yaml")
    for arm in study.arms.values():
        tracker.log_text(arm.topology.to_yaml(), f"arms/{arm.name}.yaml")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": tracker.run_id}))
    return tracker.run_id


def finish(args: argparse.Namespace, tracker, study, parent_run_id: str, tracking_uri: str,
           display: Display | None = None) -> int:
    """The tables printed and, with the figures, logged to the parent run; the parent ended."""
    from cohort.studies.results import find_parent

    parent = find_parent(tracker.client, study.experiment, study.name)
    display = display or Display("log")
    tables, found = result_tables(tracker.client, study, parent)
    display.summary(tables_text(study, tables, found, args.format))
    out = figures_folder(args, study)
    written = draw(tracker.client, study, tables, found, out)
    for fmt in FORMATS:
        tracker.log_text(tables_text(study, tables, found, fmt), f"tables/{fmt_file(fmt)}")
    for path in written:
        tracker.log_file(path, "figures")
    finished = sum(outcome.status == "FINISHED" for outcome in found)
    tracker.finish("FINISHED" if finished else "FAILED")
    display.summary(f"\nfigures: {out}/ ({len(written)} files); MLflow parent run {parent_run_id} at {tracking_uri}")
    display.json("done", study=study.name, parent_run_id=parent_run_id, finished=finished, runs=len(found),
                 figures=str(out))
    if not finished:
        raise CohortError("no run of the study finished: see the reasons above")
    register_best(tracker.client, study, found, args.registrations, tracking_uri, display)
    return 0


def fmt_file(fmt: str) -> str:
    return {"table": "tables.txt", "markdown": "tables.md", "csv": "tables.csv", "latex": "tables.tex"}[fmt]


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
