"""One session of a sweep (the library of ``python -m cohort.tune`` and ``cohort.sweep``): the
topology and space checked before Ray starts, the parent MLflow run (started, or found again to
resume), the Tuner, and at the end the ranked trials, the best topology written and logged.

The result is a :class:`SweepResult`: the parent run, the best trial, its values and topology, the
best file's path, and the ranked trials as a ``pandas.DataFrame``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohort.config.errors import CohortError, quoted
from cohort.console.display import Display, lasting_mode
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
    reuses_trial_processes,
    sampled_text,
    share_datasets,
    short_value,
    unfinished_trials,
)
from cohort.worker.report import OBJECTIVE

if TYPE_CHECKING:
    import pandas

    from cohort.tracking.tracker import Tracker

DEFAULT_STORAGE = "~/ray_results/cohort-tune"


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its parent MLflow run, the best trial (its sampled values, its metric's
    value, its topology and the file that holds it) and every trial, best first (``table()``)."""

    name: str
    experiment: str
    parent_run_id: str
    tracking_uri: str
    metric: str  # the space's metric expression
    mode: str  # min or max
    best_trial: str
    best_value: float
    best_config: dict[str, Any]  # the best trial's sampled values, by dotted topology path
    best_topology: Topology
    best_file: Path
    trials: tuple[dict[str, Any], ...]  # best first: trial, config, value (None: no result), epochs, error

    def table(self) -> pandas.DataFrame:
        """The trials ranked, best first (index ``rank``, from 1): ``trial``, one column per sampled
        key, ``epochs`` (trained: fewer when the scheduler stopped it), ``value`` (the metric's last
        reported value, NaN when none), ``failed``."""
        import pandas

        keys = list(dict.fromkeys(key for row in self.trials for key in row["config"]))
        records = [{"rank": rank, "trial": row["trial"], **{key: row["config"].get(key) for key in keys},
                    "epochs": row["epochs"], "value": float("nan") if row["value"] is None else row["value"],
                    "failed": bool(row["error"])} for rank, row in enumerate(self.trials, 1)]
        return pandas.DataFrame.from_records(records).set_index("rank")


def prepare(topology: Topology, space_path: str | Path, num_samples: int | None = None,
            tracking_uri: str | None = None):
    """The sweep's topology (checkpoints pinned), its tracking URI, the checkpoints' weights, the
    space and the number of samples: all checked before Ray starts."""
    from cohort.datasets import describe_dataset
    from cohort.driver.launch import fetch_checkpoints, load_checkpoints
    from cohort.tracking.tracker import resolve_uri
    from cohort.tuning.search_space import load_space
    from cohort.worker.report import report_keys

    tracking_uri = resolve_uri(tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), tracking_uri)
    # The checkpoints' weights, read here once and handed to every trial through Ray's object store
    # (Tune's with_parameters): no trial or worker opens a checkpoint path.
    weights = load_checkpoints(topology, tracking_uri)
    space = load_space(space_path, topology)
    if num_samples is not None and num_samples < 1:
        raise CohortError(f"--num-samples must be at least 1, not {num_samples}")
    samples = num_samples or space.num_samples
    expression = space.parsed_metric()

    info = describe_dataset(topology.data)
    available = report_keys(topology, info)
    missing = expression.missing(dict.fromkeys(available, 0.0))
    if missing:
        raise CohortError(f"metric: {quoted(missing[0])} is not reported (available: {', '.join(available)})",
                          Path(space_path).name)
    check_pbt(space, topology, Path(space_path).name)
    return topology, tracking_uri, weights, space, samples


def start_parent(store: Tracker, space_path: str | Path, topology: Topology, space, samples: int, name: str,
                 state_file: Path, state: dict[str, Any]) -> Tracker:
    """The sweep's parent MLflow run, created or found again (--resume): its own tracker."""
    if state:
        return store.for_run(state["parent_run_id"])
    parent = store.for_run(store.start(topology, run_name=f"sweep-{name}"))
    parent.client.set_tag(parent.run_id, "cohort.sweep", name)
    parent.log_params({f"space.{key}": json.dumps(spec) for key, spec in space.space.items()})
    parent.log_params({"space.metric": space.metric, "space.mode": space.mode, "space.num_samples": samples})
    parent.log_text(Path(space_path).read_text(), "space.yaml")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": parent.run_id}))
    return parent


def sweep(topology: Topology, space_path: str | Path, *, num_samples: int | None = None, name: str | None = None,
          resume: bool = False, tracking_uri: str | None = None, storage: str | None = None,
          address: str | None = None, out: str | Path = ".", overwrite: bool = False, verbose: bool = False,
          display: Display | None = None) -> SweepResult:
    """The sweep of ``topology`` over the space file through Ray Tune (started, or resumed), then
    its ranked trials and the best topology written to ``out/best_<name>.yaml`` and logged."""
    from cohort.driver.cluster import start_ray, started_here
    from cohort.driver.reclaim import Reclaimer
    from cohort.tracking.tracker import Tracker
    from cohort.tuning.callbacks import ReclaimCallback
    from cohort.tuning.search_space import tune_distribution

    display = display or Display("log")
    topology, tracking_uri, weights, space, samples = prepare(topology, space_path, num_samples, tracking_uri)
    name = name or f"{topology.name}-{Path(space_path).stem}"
    best_path = best_file(out, overwrite, name)  # checked before the sweep starts
    storage = os.path.abspath(os.path.expanduser(storage or DEFAULT_STORAGE))
    sweep_dir = Path(storage) / name
    store = Tracker(tracking_uri, topology.experiment)
    # A Ray started here runs its dashboard, on 127.0.0.1 only: a sweep is long enough to watch (the
    # CPUs of trials that Tune stops come back through cohort.driver.reclaim, not its state API).
    cluster = start_ray(address, verbose, dashboard=True)
    concurrent, cpus_per_peer = plan_resources(topology.num_workers, samples, float(cluster.get("CPU", 0)),
                                               space.max_concurrent, topology.resources.cpus_per_peer)

    import ray.tune
    state_file = sweep_dir.parent / f"{name}.cohort.json"
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
    if resume and not (state and ray.tune.Tuner.can_restore(str(sweep_dir))):
        raise CohortError(f"--resume: no interrupted sweep named {name!r} in {storage}")
    if not resume and sweep_dir.exists():
        raise CohortError(f"a sweep named {name!r} exists in {storage}: --resume it, or choose another --name")

    # The data, decoded once here for every trial whose sampled values keep it.
    datasets = share_datasets([topology])
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(cohort_trial, base=topology.to_dict(), objective=space.metric,
                                 cpus_per_peer=cpus_per_peer, threads=max(1, int(cpus_per_peer)),
                                 storage=str(Path(storage) / f"{name}-trainers"), weights=weights,
                                 resource_requests=not started_here(), datasets=datasets),
        {"CPU": TRIAL_CPU})
    parent = start_parent(store, space_path, topology, space, samples, name, state_file, state)
    children_file = sweep_dir.parent / f"{name}.children.json"
    callback = SweepCallback(tracking_uri, topology.experiment, parent.run_id, topology.train.epochs, space.metric,
                             children_file, base=topology.to_dict(), total=expected_trials(space, samples),
                             display=lasting_mode(display.mode))
    param_space = {key: tune_distribution(spec) for key, spec in space.space.items()}

    expected = expected_trials(space, samples)
    display.info(f"sweep {name}: {expected} trials of {len(topology.peers)} peers, {concurrent} at a time "
                 f"({cpus_per_peer:g} CPU per peer), {space.mode} {space.metric}, scheduler {space.scheduler.name}, "
                 f"search {space.search.name}\nMLflow parent run {parent.run_id} (experiment {topology.experiment!r})")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own lines replace Tune's status tables
    # Before any trial: the placement groups already there are not the sweep's to remove.
    reclaimer = Reclaimer()
    run_config = ray.tune.RunConfig(
        name=name, storage_path=storage, callbacks=[callback, ReclaimCallback(reclaimer)], verbose=0,
        failure_config=ray.tune.FailureConfig(max_failures=0),
        # A resumed trial continues from its latest checkpoint; PBT may copy any top trial's latest.
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None if space.scheduler.name == "pbt" else 1))
    if resume:
        tuner = ray.tune.Tuner.restore(str(sweep_dir), trainable=trainable, param_space=param_space,
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space, run_config=run_config,
            tune_config=ray.tune.TuneConfig(metric=OBJECTIVE, mode=space.mode, num_samples=samples,
                                            max_concurrent_trials=concurrent, scheduler=make_scheduler(space, topology),
                                            search_alg=make_search(space, topology, concurrent),
                                            reuse_actors=reuses_trial_processes(space)))
    started = time.perf_counter()
    # Tune suggests actor reuse for PBT: PBT stops a trial inside its fit (reuses_trial_processes).
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted: continue with --resume --name {name}", file=sys.stderr)
        raise
    finally:
        reclaimer.settle()  # the CPUs of the trials Tune stopped last, for what this driver runs next
    unfinished = unfinished_trials(sweep_dir, expected)
    if unfinished:
        # Tune catches Ctrl-C itself and returns what it had: the sweep is not over.
        parent.finish("KILLED")
        raise CohortError(f"sweep {name} interrupted with {unfinished} trial(s) unfinished: continue with "
                          f"--resume --name {name}")
    display.summary(f"\nsweep {name} done in {time.perf_counter() - started:.0f}s\n")
    return finish(parent, topology, space, results, name, best_path, display)


def finish(parent: Tracker, topology: Topology, space, results, name: str, best_path: Path,
           display: Display | None = None) -> SweepResult:
    """The trials' table, the best topology written and logged, the parent run ended."""
    from cohort.topology import topology_from_dict

    display = display or Display("log")
    rows = ranked_trials(results, space.mode)
    display.summary(trials_table(rows, space.metric, list(space.space)))
    best = next((row for row in rows if row["value"] is not None), None)
    status = "FINISHED" if best is not None else "FAILED"
    if best is None:
        parent.finish(status)
        raise CohortError("no trial finished: see the reasons above")
    best_topology = topology_from_dict(topology.to_dict(), "best", best["config"])
    best_path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best of sweep {name}: {space.metric} = {best['value']:.6g} ({space.mode}), trial {best['trial']}\n"
              f"# Sampled: {sampled_text(best['config'])}\n")
    best_path.write_text(header + best_topology.to_yaml())
    parent.log_params({f"best.{key}": value for key, value in best["config"].items()})
    parent.client.log_metric(parent.run_id, f"best_{OBJECTIVE}", best["value"])
    parent.log_file(best_path)
    parent.finish(status)
    display.summary(f"\nbest: trial {best['trial']}, {space.metric} = {best['value']:.4f}; topology written to "
                    f"{best_path}")
    display.summary(f"MLflow parent run {parent.run_id} at {parent.uri}")
    display.json("done", sweep=name, parent_run_id=parent.run_id, best_trial=best["trial"], best_value=best["value"],
                 best_config=best["config"], topology=str(best_path))
    return SweepResult(name, topology.experiment, parent.run_id, parent.uri, space.metric, space.mode, best["trial"],
                       best["value"], dict(best["config"]), best_topology, best_path, tuple(rows))


def best_file(out: str | Path, overwrite: bool, name: str) -> Path:
    """Where the sweep's best topology goes, ``out/best_<sweep name>.yaml``: a sweep does not
    replace another's, nor (without --overwrite) its own of an earlier session."""
    from cohort.console.outputs import check_output_file

    return check_output_file(Path(out) / f"best_{name}.yaml", "--out", overwrite, make_folders=True)


def trials_table(rows: list[dict[str, Any]], metric: str, keys: list[str]) -> str:
    header = ["rank", "trial", *keys, "epochs", metric]
    body = []
    for rank, row in enumerate(rows, 1):
        value = f"{row['value']:.4f}" if row["value"] is not None else ("failed" if row["error"] else "-")
        body.append([str(rank), str(row["trial"]), *(short_value(row["config"].get(key, "")) for key in keys),
                     str(row["epochs"]), value])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header] + body)
