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
import warnings
from pathlib import Path
from typing import Any

from ray.train import UserCallback
from ray.tune import Callback

from cohort.errors import CohortError, quoted, run_command

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


class ForwardReports(UserCallback):
    """Ray Train callback (it runs in the trainer's controller): hands every epoch's report, with
    the checkpoint Train has just persisted, to the trial's own process.

    Ray's ``TuneReportCallback`` forwards the metrics alone; PBT copies a better trial's
    checkpoint into a worse one, and a resumed sweep continues unfinished trials from theirs, so
    Tune must receive the checkpoints too.
    """

    def __init__(self, reports):
        self.reports = reports

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.put((metrics[0], checkpoint))


def cohort_trial(sampled: dict[str, Any], base: dict[str, Any], objective: str, cpus_per_peer: float, threads: int,
                 storage: str, weights: dict[str, Any] | None = None) -> None:
    """Tune's function trainable: one whole cohort with the sampled values applied.

    The cohort starts from Tune's checkpoint when there is one (PBT's exploit, or a resumed
    sweep), with this trial's values, and reports each epoch with its checkpoint to Tune.
    """
    import queue
    import uuid

    import ray.tune
    from ray.util.queue import Queue

    from cohort.run import fit_in_background, make_trainer
    from cohort.topology import topology_from_dict

    # An invalid sample fails this trial with the reason; the sweep goes on.
    topology = topology_from_dict(base, "sampled topology", sampled)
    # The workers may have to wait until the previous trial's have released their CPUs (Ray Train
    # passes this process's setting on to the trainer it starts).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    trial = ray.tune.get_context().get_trial_id()
    # One report at a time: like TuneReportCallback, Train waits while Tune decides on the last.
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # A fresh Train run each time: Train would otherwise resume the run of that name from its own
    # last checkpoint instead of starting from the one Tune hands this trial.
    trainer = make_trainer(topology, cpus_per_peer, threads, storage, f"{topology.name}-{trial}-{uuid.uuid4().hex[:6]}",
                           objective=objective, callbacks=(ForwardReports(reports),),
                           initial_checkpoint=ray.tune.get_checkpoint(), weights=weights)
    thread, outcome = fit_in_background(trainer)
    while thread.is_alive() or not reports.empty():
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except queue.Empty:
            continue
        if checkpoint is not None:
            checkpoint = ray.tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        ray.tune.report(metrics, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


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
        self.configs: dict[str, dict[str, Any]] = {}  # each trial's values as last started (PBT changes them)
        self.changes: dict[str, dict[str, Any]] = {}  # values PBT changed, to log with the trial's next epoch
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
        if trial.trial_id not in self.last_epoch:
            # A resumed sweep: the epochs its run already holds in MLflow are done.
            history = self.tracker.client.get_metric_history(self.tracker.run_id, OBJECTIVE)
            self.last_epoch[trial.trial_id] = max((metric.step for metric in history), default=0)
        return self.tracker.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._child(trial)
        config = dict(trial.config)
        before = self.configs.setdefault(trial.trial_id, config)
        if config != before:
            # PBT restarts this trial from a better trial's checkpoint with perturbed values.
            self.changes[trial.trial_id] = {key: value for key, value in config.items() if before.get(key) != value}
            self.configs[trial.trial_id] = config
        print(f"trial {trial.trial_id} started: {_sampled_text(trial.config)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._child(trial)
        epoch = int(result.get("epoch", 0))
        changed = self.changes.pop(trial.trial_id, None)
        if changed:
            self.tracker.client.set_tag(self.tracker.run_id, f"cohort.pbt.epoch_{epoch:03d}", json.dumps(changed))
            print(f"trial {trial.trial_id} continues from a better trial's checkpoint (PBT) at epoch {epoch} with "
                  f"{_sampled_text(changed)}", flush=True)
            self.last_epoch[trial.trial_id] = epoch - 1  # the trial's history goes on from the copied epoch
        # A resumed trial trains again the epochs after its last checkpoint: log each epoch once.
        if epoch > self.last_epoch.get(trial.trial_id, 0):
            self.tracker.log_epoch({**{k: v for k, v in result.items() if "/" in k or k == OBJECTIVE}, "epoch": epoch})
        self.last_epoch[trial.trial_id] = epoch
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


def make_scheduler(space, topology):
    """Tune's scheduler for the space file's ``scheduler`` section; every one counts in epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    from cohort.search_space import tune_distribution

    settings = space.scheduler
    if settings.name == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=topology.train.epochs, grace_period=settings.grace_period,
                             reduction_factor=settings.reduction_factor)
    if settings.name == "pbt":
        class CohortPBT(PopulationBasedTraining):
            """PBT that leaves a trial's last epoch alone: exploiting then would restart a cohort
            with nothing left to train and hand it the better trial's result as its own."""

            def on_trial_result(self, tune_controller, trial, result):
                if result.get("epoch", 0) >= topology.train.epochs:
                    return self.CONTINUE
                return super().on_trial_result(tune_controller, trial, result)

        return CohortPBT(
            time_attr="epoch", perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations={key: tune_distribution(spec) for key, spec in space.mutations().items()},
            quantile_fraction=settings.quantile_fraction, resample_probability=settings.resample_probability,
            synch=settings.synch)
    return FIFOScheduler()


def check_pbt(space, topology, where: str) -> None:
    """PBT copies checkpoints at its perturbation epochs: there must be some, inside the run."""
    if space.scheduler.name != "pbt":
        return
    interval, epochs = space.scheduler.perturbation_interval, topology.train.epochs
    if interval >= epochs:
        raise CohortError(f"scheduler.perturbation_interval: {interval} epochs leaves no perturbation in a run of "
                          f"{epochs} epochs (train.epochs)", where)
    every = topology.train.checkpoint_every
    if interval % every:
        raise CohortError(f"scheduler.perturbation_interval: {interval} is not a multiple of train.checkpoint_every "
                          f"({every}): PBT copies the checkpoint of the epoch it perturbs at", where)


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
    from cohort.run import fetch_checkpoints, load_checkpoints, start_ray
    from cohort.search_space import load_space, tune_distribution
    from cohort.topology import load_topology
    from cohort.tracking import Tracker, resolve_uri
    from cohort.worker import report_keys

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

    from cohort.datasets import describe_dataset

    info = describe_dataset(topology.data)
    available = report_keys(topology, info)
    missing = expression.missing(dict.fromkeys(available, 0.0))
    if missing:
        raise CohortError(f"metric: {quoted(missing[0])} is not reported (available: {', '.join(available)})",
                          Path(args.space).name)
    check_pbt(space, topology, Path(args.space).name)

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

    scheduler = make_scheduler(space, topology)
    if space.search.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=topology.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        # Seeded by the topology, so a sweep samples the same values when run again.
        search_alg = BasicVariantGenerator(random_state=topology.seed, max_concurrent=concurrent)
    param_space = {key: tune_distribution(spec) for key, spec in space.space.items()}

    expected = samples * math.prod(len(spec["grid"]) for spec in space.space.values() if "grid" in spec)
    print(f"sweep {name}: {expected} trials of {len(topology.peers)} peers, {concurrent} at a time "
          f"({cpus_per_peer:g} CPU per peer), {space.mode} {space.metric}, scheduler {space.scheduler.name}, "
          f"search {space.search.name}\nMLflow parent run {parent_run_id} (experiment {topology.experiment!r})",
          flush=True)
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
                                            max_concurrent_trials=concurrent, scheduler=scheduler,
                                            search_alg=search_alg))
    started = time.perf_counter()
    # Tune suggests actor reuse for PBT; a cohort trial is a whole Train run and cannot be reused.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted: continue with --resume --name {name}", file=sys.stderr)
        raise
    # Trials Tune never created, and those its saved state (which --resume reads) leaves to run:
    # after Ctrl-C Tune saves the running trials as pending and returns normally.
    saved = ray.tune.ExperimentAnalysis(str(sweep_dir)).trials
    unfinished = expected - len(saved) + sum(1 for trial in saved if trial.status not in ("TERMINATED", "ERROR"))
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
