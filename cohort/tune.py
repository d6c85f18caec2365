"""``python -m cohort.tune TOPOLOGY.yaml SPACE.yaml``: search a cohort's settings with Ray Tune.

Any value of the topology can be searched: loss weights, temperatures, learning rates.

Every trial is a whole cohort: the trial's function builds the sampled topology and runs its
``TorchTrainer`` (one worker per peer), whose rank 0 reports each epoch's metrics, and the
space's metric as ``objective``, to Tune through ``TuneReportCallback``. The driver is the one
MLflow writer: a parent run for the sweep, a child run per trial.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError, quoted
from cohort.console.command import run_command
from cohort.console.display import Display, add_display_options, mode_of, saved_mode
from cohort.topology import Topology
from cohort.tuning.sweep import (
    TRIAL_CPU,
    SweepCallback,
    check_pbt,
    cohort_trial,
    expected_trials,
    make_scheduler,
    make_search,
    plan_resources,
    ranked_trials,
    sampled_text,
    short_value,
    unfinished_trials,
)
from cohort.worker.report import OBJECTIVE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.tune", description=__doc__.splitlines()[0])
    parser.add_argument("topology", help="the topology YAML file to start from")
    parser.add_argument("space", help="the search-space YAML file (see tune_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a topology value for every trial, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--num-samples", type=int, help="trials to run (default: the space file's num_samples)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start Ray here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the topology's, else sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="where Tune keeps the sweep (default: ~/ray_results/cohort-tune)")
    parser.add_argument("--name", help="the sweep's name (default: <topology name>-<space file name>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("--out", default=".", help="folder for best_<sweep name>.yaml (default: the working "
                                                   "directory); checked before the sweep starts")
    parser.add_argument("--overwrite", action="store_true", help="replace a best_<sweep name>.yaml that exists "
                                                                 "(default: refuse, before the sweep starts)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    add_display_options(parser)
    return parser.parse_args(argv)



def prepare(args: argparse.Namespace):
    """The sweep's topology (checkpoints pinned), its tracking URI, the checkpoints' weights, the
    space and the number of samples: all checked before Ray starts."""
    from cohort.datasets import describe_dataset
    from cohort.driver.launch import fetch_checkpoints, load_checkpoints
    from cohort.topology import load_topology
    from cohort.tracking.tracker import resolve_uri
    from cohort.tuning.search_space import load_space
    from cohort.worker.report import report_keys

    topology = load_topology(args.topology, args.overrides)
    tracking_uri = resolve_uri(args.tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), tracking_uri)
    # The checkpoints' weights, read here once and handed to every trial through Ray's object store
    # (Tune's with_parameters): no trial or worker opens a checkpoint path.
    weights = load_checkpoints(topology, tracking_uri)
    space = load_space(args.space, topology)
    if args.num_samples is not None and args.num_samples < 1:
        raise CohortError(f"--num-samples must be at least 1, not {args.num_samples}")
    samples = args.num_samples or space.num_samples
    expression = space.parsed_metric()

    info = describe_dataset(topology.data)
    available = report_keys(topology, info)
    missing = expression.missing(dict.fromkeys(available, 0.0))
    if missing:
        raise CohortError(f"metric: {quoted(missing[0])} is not reported (available: {', '.join(available)})",
                          Path(args.space).name)
    check_pbt(space, topology, Path(args.space).name)
    return topology, tracking_uri, weights, space, samples


def start_parent(args: argparse.Namespace, tracker, topology: Topology, space, samples: int, name: str, state_file: Path,
                 state: dict[str, Any]) -> str:
    """The sweep's parent MLflow run: created, or found again (--resume); its id."""
    if state:
        tracker.run_id = state["parent_run_id"]
        return tracker.run_id
    tracker.start(topology, run_name=f"sweep-{name}")
    tracker.client.set_tag(tracker.run_id, "cohort.sweep", name)
    tracker.log_params({f"space.{key}": json.dumps(spec) for key, spec in space.space.items()})
    tracker.log_params({"space.metric": space.metric, "space.mode": space.mode, "space.num_samples": samples})
    tracker.log_text(Path(args.space).read_text(), "space.yaml")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": tracker.run_id}))
    return tracker.run_id


def run(args: argparse.Namespace) -> int:
    from cohort.driver.cluster import start_ray
    from cohort.tracking.tracker import Tracker
    from cohort.tuning.search_space import tune_distribution

    topology, tracking_uri, weights, space, samples = prepare(args)
    name = args.name or f"{topology.name}-{Path(args.space).stem}"
    args.best_file = best_file(args, name)  # checked before the sweep starts
    storage = os.path.abspath(os.path.expanduser(args.storage or "~/ray_results/cohort-tune"))
    sweep_dir = Path(storage) / name
    tracker = Tracker(tracking_uri, topology.experiment)
    # Ray Train releases the workers of a trial that Tune stops early through the state API, which
    # the dashboard serves: a Ray started here runs it, on 127.0.0.1 only.
    cluster = start_ray(args.address, args.verbose, dashboard=True)
    concurrent, cpus_per_peer = plan_resources(topology.num_workers, samples, float(cluster.get("CPU", 0)),
                                               space.max_concurrent, topology.resources.cpus_per_peer)

    import ray.tune
    state_file = sweep_dir.parent / f"{name}.cohort.json"
    state = json.loads(state_file.read_text()) if args.resume and state_file.exists() else {}
    if args.resume and not (state and ray.tune.Tuner.can_restore(str(sweep_dir))):
        raise CohortError(f"--resume: no interrupted sweep named {name!r} in {storage}")
    if not args.resume and sweep_dir.exists():
        raise CohortError(f"a sweep named {name!r} exists in {storage}: --resume it, or choose another --name")

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(cohort_trial, base=topology.to_dict(), objective=space.metric,
                                 cpus_per_peer=cpus_per_peer, threads=max(1, int(cpus_per_peer)),
                                 storage=str(Path(storage) / f"{name}-trainers"), weights=weights),
        {"CPU": TRIAL_CPU})
    parent_run_id = start_parent(args, tracker, topology, space, samples, name, state_file, state)
    children_file = sweep_dir.parent / f"{name}.children.json"
    callback = SweepCallback(tracking_uri, topology.experiment, parent_run_id, topology.train.epochs, space.metric,
                             children_file, base=topology.to_dict(), total=expected_trials(space, samples),
                             display=saved_mode(args))
    param_space = {key: tune_distribution(spec) for key, spec in space.space.items()}

    expected = expected_trials(space, samples)
    display = Display(mode_of(args))
    display.info(f"sweep {name}: {expected} trials of {len(topology.peers)} peers, {concurrent} at a time "
          f"({cpus_per_peer:g} CPU per peer), {space.mode} {space.metric}, scheduler {space.scheduler.name}, "
          f"search {space.search.name}\nMLflow parent run {parent_run_id} (experiment {topology.experiment!r})")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own lines replace Tune's status tables
    run_config = ray.tune.RunConfig(
        name=name, storage_path=storage, callbacks=[callback], verbose=0,
        failure_config=ray.tune.FailureConfig(max_failures=0),
        # A resumed trial continues from its latest checkpoint; PBT may copy any top trial's latest.
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None if space.scheduler.name == "pbt" else 1))
    if args.resume:
        tuner = ray.tune.Tuner.restore(str(sweep_dir), trainable=trainable, param_space=param_space,
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space, run_config=run_config,
            tune_config=ray.tune.TuneConfig(metric=OBJECTIVE, mode=space.mode, num_samples=samples,
                                            max_concurrent_trials=concurrent, scheduler=make_scheduler(space, topology),
                                            search_alg=make_search(space, topology, concurrent)))
    started = time.perf_counter()
    # Tune suggests actor reuse for PBT; a cohort trial is a whole Train run and cannot be reused.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted: continue with --resume --name {name}", file=sys.stderr)
        raise
    unfinished = unfinished_trials(sweep_dir, expected)
    if unfinished:
        # Tune catches Ctrl-C itself and returns what it had: the sweep is not over.
        tracker.run_id = parent_run_id
        tracker.finish("KILLED")
        raise CohortError(f"sweep {name} interrupted with {unfinished} trial(s) unfinished: continue with "
                          f"--resume --name {name}")
    display.summary(f"\nsweep {name} done in {time.perf_counter() - started:.0f}s\n")
    return finish(args, tracker, topology, space, results, name, parent_run_id, tracking_uri, display)


def finish(args: argparse.Namespace, tracker, topology: Topology, space, results, name: str, parent_run_id: str,
           tracking_uri: str, display: Display | None = None) -> int:
    """The trials' table, the best topology written and logged, the parent run ended."""
    from cohort.topology import topology_from_dict

    display = display or Display("log")
    rows = ranked_trials(results, space.mode)
    display.summary(trials_table(rows, space.metric, list(space.space)))
    best = next((row for row in rows if row["value"] is not None), None)
    status = "FINISHED" if best is not None else "FAILED"
    if best is None:
        tracker.finish(status)
        raise CohortError("no trial finished: see the reasons above")
    best_topology = topology_from_dict(topology.to_dict(), "best", best["config"])
    out = args.best_file
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best of sweep {name}: {space.metric} = {best['value']:.6g} ({space.mode}), trial {best['trial']}\n"
              f"# Sampled: {sampled_text(best['config'])}\n")
    out.write_text(header + best_topology.to_yaml())
    tracker.run_id = parent_run_id
    tracker.log_params({f"best.{key}": value for key, value in best["config"].items()})
    tracker.client.log_metric(parent_run_id, f"best_{OBJECTIVE}", best["value"])
    tracker.log_file(out)
    tracker.finish(status)
    display.summary(f"\nbest: trial {best['trial']}, {space.metric} = {best['value']:.4f}; topology written to {out}")
    display.summary(f"MLflow parent run {parent_run_id} at {tracking_uri}")
    display.json("done", sweep=name, parent_run_id=parent_run_id, best_trial=best["trial"], best_value=best["value"],
                 best_config=best["config"], topology=str(out))
    return 0


def best_file(args: argparse.Namespace, name: str) -> Path:
    """Where the sweep's best topology goes, ``--out/best_<sweep name>.yaml``: a sweep does not
    replace another's, nor (without --overwrite) its own of an earlier session."""
    from cohort.console.outputs import check_output_file

    return check_output_file(Path(args.out) / f"best_{name}.yaml", "--out", args.overwrite, make_folders=True)


def trials_table(rows: list[dict[str, Any]], metric: str, keys: list[str]) -> str:
    header = ["rank", "trial", *keys, "epochs", metric]
    body = []
    for rank, row in enumerate(rows, 1):
        value = f"{row['value']:.4f}" if row["value"] is not None else ("failed" if row["error"] else "-")
        body.append([str(rank), str(row["trial"]), *(short_value(row["config"].get(key, "")) for key in keys),
                     str(row["epochs"]), value])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header] + body)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
