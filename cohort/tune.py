"""``python -m cohort.tune TOPOLOGY.yaml SPACE.yaml``: search a cohort's loss weights,
temperatures and learning rates with Ray Tune.

Every trial is a whole cohort: the trial's function builds the sampled topology and runs its
``TorchTrainer`` (one worker per peer), whose rank 0 reports each epoch's metrics, and the
space's metric as ``objective``, to Tune through ``TuneReportCallback``. The driver is the one
MLflow writer: a parent run for the sweep, a child run per trial.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from cohort.errors import CohortError, run_command

OBJECTIVE = "objective"
# The trial's own process only waits for its trainer: the peers' workers hold the CPUs. (Tune
# refuses a trial with no resources at all.)
TRIAL_CPU = 0.01


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
    parser.add_argument("--out", default=".", help="folder for best_<name>.yaml (default: the working directory)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- one trial


def cohort_trial(sampled: dict[str, Any], base: dict[str, Any], objective: str, cpus_per_peer: float, threads: int,
                 storage: str) -> None:
    """Tune's function trainable: one whole cohort with the sampled values applied."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cohort.run import make_trainer
    from cohort.topology import topology_from_dict

    # An invalid sample fails this trial with the reason; the sweep goes on.
    topology = topology_from_dict(base, "sampled topology", sampled)
    # The workers may have to wait until the previous trial's have released their CPUs (Ray Train
    # passes this process's setting on to the trainer it starts).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    trial = ray.tune.get_context().get_trial_id()
    trainer = make_trainer(topology, cpus_per_peer, threads, storage, f"{topology.name}-{trial}",
                           objective=objective, callbacks=(TuneReportCallback(),))
    trainer.fit()


# --------------------------------------------------------------------------- MLflow and the display


class SweepCallback(Callback):
    """Tune callback (runs in the driver): child MLflow runs, and one line per trial event.

    Tune saves it with the sweep; it keeps only plain data, so a resumed sweep gets it back.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, epochs: int, metric: str,
                 state_file: Path):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.parent_run_id = parent_run_id
        self.epochs = epochs
        self.metric = metric
        self.state_file = Path(state_file)
        self.last_epoch: dict[str, int] = {}
        self._tracker = None

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "_tracker"} | {"_tracker": None}

    @property
    def tracker(self):
        if self._tracker is None:
            from cohort.tracking import Tracker

            self._tracker = Tracker(self.tracking_uri, self.experiment)
        return self._tracker

    @property
    def children(self) -> dict[str, str]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _child(self, trial) -> str:
        """The trial's MLflow run (created on first sight; kept in a file so a resumed sweep finds it)."""
        children = self.children
        if trial.trial_id not in children:
            run = self.tracker.client.create_run(
                self.tracker.experiment_id, run_name=f"trial-{trial.trial_id}",
                tags={"mlflow.parentRunId": self.parent_run_id, "cohort.trial_id": trial.trial_id})
            children[trial.trial_id] = run.info.run_id
            self.state_file.write_text(json.dumps(children))
            self.tracker.run_id = run.info.run_id
            self.tracker.log_params(dict(trial.config))
        self.tracker.run_id = children[trial.trial_id]
        return self.tracker.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._child(trial)
        print(f"trial {trial.trial_id} started: {_sampled_text(trial.config)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._child(trial)
        epoch = int(result.get("epoch", 0))
        self.last_epoch[trial.trial_id] = epoch
        self.tracker.log_epoch({**{k: v for k, v in result.items() if "/" in k or k == OBJECTIVE}, "epoch": epoch})
        print(f"trial {trial.trial_id} epoch {epoch}/{self.epochs}: {self.metric} = {result.get(OBJECTIVE, math.nan):.4f}",
              flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._child(trial)
        epoch = self.last_epoch.get(trial.trial_id, 0)
        early = epoch < self.epochs
        self.tracker.client.set_tag(self.tracker.run_id, "cohort.stopped_early", str(early).lower())
        self.tracker.finish("FINISHED")
        if early:
            print(f"trial {trial.trial_id} stopped early by the scheduler after epoch {epoch}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._child(trial)
        reason = trial_failure(trial)
        self.tracker.client.set_tag(self.tracker.run_id, "cohort.error", reason[:5000])
        self.tracker.finish("FAILED")
        print(f"trial {trial.trial_id} failed: {reason}", flush=True)


def trial_failure(trial) -> str:
    """The one line that says why a trial failed."""
    from cohort.run import failure_reason

    path = getattr(trial, "error_file", None) or ""
    text = Path(path).read_text() if path and Path(path).exists() else str(getattr(trial, "error_msg", "") or "")
    for marker in ("CohortError:",):
        for line in text.splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return failure_reason(RuntimeError(text)) if text else "unknown error"


def _sampled_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_short(value)}" for key, value in config.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- the sweep


def plan_resources(num_peers: int, samples: int, cpus: float, max_concurrent: int | None,
                   cpus_per_peer: float | None) -> tuple[int, float]:
    """How many trials run at once, and each peer's CPUs: a whole CPU per peer where the cluster
    has enough, and at least two trials at once where it has two CPUs (peers then share them);
    never more CPUs than the cluster has (a trial waiting for CPUs would wait forever)."""
    concurrent = max_concurrent or min(samples, max(1, int(cpus // num_peers), min(int(cpus), 2)))
    if cpus_per_peer is None:
        cpus_per_peer = min(1.0, math.floor((cpus - concurrent * TRIAL_CPU) / (concurrent * num_peers) * 100) / 100)
        if cpus_per_peer < 0.01:
            raise CohortError(f"{concurrent} trials of {num_peers} peers do not fit on {cpus:g} CPUs "
                              "(lower max_concurrent)", "max_concurrent")
    needed = cpus_per_peer * num_peers + TRIAL_CPU
    if needed > cpus + 1e-9:
        raise CohortError(f"one trial needs {needed:g} CPUs ({num_peers} peers x {cpus_per_peer:g}, and the trial "
                          f"itself {TRIAL_CPU:g}), the Ray cluster has {cpus:g}", "resources.cpus_per_peer")
    concurrent = min(concurrent, max(1, int((cpus + 1e-9) // needed)))
    return concurrent, cpus_per_peer


def run(args: argparse.Namespace) -> int:
    from cohort.run import fetch_checkpoints, start_ray
    from cohort.search_space import load_space, tune_distribution
    from cohort.topology import load_topology
    from cohort.tracking import Tracker, resolve_uri
    from cohort.worker import report_keys

    topology = load_topology(args.topology, args.overrides)
    tracking_uri = resolve_uri(args.tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), tracking_uri)
    space = load_space(args.space, topology)
    if args.num_samples is not None and args.num_samples < 1:
        raise CohortError(f"--num-samples must be at least 1, not {args.num_samples}")
    samples = args.num_samples or space.num_samples
    expression = space.parsed_metric()

    from cohort.data import describe_dataset

    info = describe_dataset(topology.data)
    available = report_keys(topology, info)
    missing = expression.missing(dict.fromkeys(available, 0.0))
    if missing:
        raise CohortError(f"metric: {missing[0]!r} is not reported (available: {', '.join(available)})",
                          Path(args.space).name)

    name = args.name or f"{topology.name}-{Path(args.space).stem}"
    storage = os.path.abspath(os.path.expanduser(args.storage or "~/ray_results/cohort-tune"))
    sweep_dir = Path(storage) / name
    tracker = Tracker(tracking_uri, topology.experiment)
    # Ray Train releases the workers of a trial that Tune stops early through the state API, which
    # the dashboard serves: a Ray started here runs it, on 127.0.0.1 only.
    cluster = start_ray(args.address, args.verbose, dashboard=True)
    concurrent, cpus_per_peer = plan_resources(topology.num_workers, samples, float(cluster.get("CPU", 0)),
                                               space.max_concurrent, topology.resources.cpus_per_peer)

    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    state_file = sweep_dir.parent / f"{name}.cohort.json"
    state = json.loads(state_file.read_text()) if args.resume and state_file.exists() else {}
    if args.resume and not (state and ray.tune.Tuner.can_restore(str(sweep_dir))):
        raise CohortError(f"--resume: no interrupted sweep named {name!r} in {storage}")
    if not args.resume and sweep_dir.exists():
        raise CohortError(f"a sweep named {name!r} exists in {storage}: --resume it, or choose another --name")

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(cohort_trial, base=topology.to_dict(), objective=space.metric,
                                 cpus_per_peer=cpus_per_peer, threads=max(1, int(cpus_per_peer)),
                                 storage=str(Path(storage) / f"{name}-trainers")),
        {"CPU": TRIAL_CPU})
    if state:
        tracker.run_id = state["parent_run_id"]
    else:
        tracker.start(topology, run_name=f"sweep-{name}")
        tracker.client.set_tag(tracker.run_id, "cohort.sweep", name)
        tracker.log_params({f"space.{key}": json.dumps(spec) for key, spec in space.space.items()})
        tracker.log_params({"space.metric": space.metric, "space.mode": space.mode, "space.num_samples": samples})
        tracker.log_text(Path(args.space).read_text(), "space.yaml")
        sweep_dir.parent.mkdir(parents=True, exist_ok=True)
        state = {"parent_run_id": tracker.run_id}
        state_file.write_text(json.dumps(state))
    parent_run_id = state["parent_run_id"]
    children_file = sweep_dir.parent / f"{name}.children.json"
    callback = SweepCallback(tracking_uri, topology.experiment, parent_run_id, topology.train.epochs, space.metric,
                             children_file)

    if space.scheduler.name == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=topology.train.epochs, grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if space.search.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=topology.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        # Seeded by the topology, so a sweep samples the same values when run again.
        search_alg = BasicVariantGenerator(random_state=topology.seed, max_concurrent=concurrent)
    param_space = {key: tune_distribution(spec) for key, spec in space.space.items()}

    print(f"sweep {name}: {samples} trials of {len(topology.peers)} peers, {concurrent} at a time "
          f"({cpus_per_peer:g} CPU per peer), {space.mode} {space.metric}, scheduler {space.scheduler.name}, "
          f"search {space.search.name}\nMLflow parent run {parent_run_id} (experiment {topology.experiment!r})",
          flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own lines replace Tune's status tables
    run_config = ray.tune.RunConfig(name=name, storage_path=storage, callbacks=[callback], verbose=0,
                                    failure_config=ray.tune.FailureConfig(max_failures=0))
    if args.resume:
        tuner = ray.tune.Tuner.restore(str(sweep_dir), trainable=trainable, param_space=param_space,
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space, run_config=run_config,
            tune_config=ray.tune.TuneConfig(metric=OBJECTIVE, mode=space.mode, num_samples=samples,
                                            max_concurrent_trials=concurrent, scheduler=scheduler,
                                            search_alg=search_alg))
    started = time.perf_counter()
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted: continue with --resume --name {name}", file=sys.stderr)
        raise
    expected = samples * math.prod(len(spec["grid"]) for spec in space.space.values() if "grid" in spec)
    unfinished = expected - len(results) + sum(1 for result in results
                                               if result.error is None and not (result.metrics or {}).get("epoch"))
    if unfinished:
        # Tune catches Ctrl-C itself and returns what it had: the sweep is not over.
        tracker.run_id = parent_run_id
        tracker.finish("KILLED")
        raise CohortError(f"sweep {name} interrupted with {unfinished} trial(s) unfinished: continue with "
                          f"--resume --name {name}")
    rows = ranked_trials(results, space.mode)
    print(f"\nsweep {name} done in {time.perf_counter() - started:.0f}s\n")
    print(trials_table(rows, space.metric, list(space.space)))
    best = next((row for row in rows if row["value"] is not None), None)
    status = "FINISHED" if best is not None else "FAILED"
    if best is None:
        tracker.finish(status)
        raise CohortError("no trial finished: see the reasons above")
    from cohort.topology import topology_from_dict

    best_topology = topology_from_dict(topology.to_dict(), "best", best["config"])
    out = Path(args.out) / f"best_{topology.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best of sweep {name}: {space.metric} = {best['value']:.6g} ({space.mode}), trial {best['trial']}\n"
              f"# Sampled: {_sampled_text(best['config'])}\n")
    out.write_text(header + best_topology.to_yaml())
    tracker.run_id = parent_run_id
    tracker.log_params({f"best.{key}": value for key, value in best["config"].items()})
    tracker.client.log_metric(parent_run_id, f"best_{OBJECTIVE}", best["value"])
    tracker.log_file(out)
    tracker.finish(status)
    print(f"\nbest: trial {best['trial']}, {space.metric} = {best['value']:.4f}; topology written to {out}")
    print(f"MLflow parent run {parent_run_id} at {tracking_uri}")
    return 0


def ranked_trials(results, mode: str) -> list[dict[str, Any]]:
    """Every trial with its last reported objective, best first; failed trials last."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        value = metrics.get(OBJECTIVE)
        rows.append({
            "trial": metrics.get("trial_id") or Path(str(result.path)).name,
            "config": result.config or {},
            "value": value if isinstance(value, (int, float)) and math.isfinite(value) else None,
            "epochs": int(metrics.get("epoch", 0)),
            "error": result.error is not None,
        })
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row["value"] is None, sign * row["value"] if row["value"] is not None else 0))
    return rows


def trials_table(rows: list[dict[str, Any]], metric: str, keys: list[str]) -> str:
    header = ["rank", "trial", *keys, "epochs", metric]
    body = []
    for rank, row in enumerate(rows, 1):
        value = f"{row['value']:.4f}" if row["value"] is not None else ("failed" if row["error"] else "-")
        body.append([str(rank), str(row["trial"]), *(_short(row["config"].get(key, "")) for key in keys),
                     str(row["epochs"]), value])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header] + body)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
