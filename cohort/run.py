"""``python -m cohort.run TOPOLOGY.yaml``: train a cohort, one Ray Train worker per peer.

The driver validates the topology and everything it points at before Ray starts, launches one
``TorchTrainer``, prints one line per epoch from the metrics rank 0 sends it, and is the single
MLflow writer of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError
from cohort.console.command import deferred_interrupt, run_command
from cohort.console.display import Display, EpochDisplay, add_display_options, mode_of
from cohort.driver.cluster import cluster_node_labels
from cohort.driver.launch import (
    RUN_FILE,
    Plan,
    failure_reason,
    fetch_checkpoints,
    fit_cluster,
    fit_in_background,
    make_plan,
    make_trainer,
    plan_while_ray_starts,
    storage_location,
)
from cohort.tracking.logged_models import (
    exported_peers,
    log_peer_models,
    model_uri,
    parse_registrations,
    peer_test_metrics,
    register_peer,
    registered_line,
    registry_tags,
    test_metric_names,
)
from cohort.worker.grid import exchange_backend, worker_grid
from cohort.worker.report import ENSEMBLE, cohort_key, evaluated, metric_key
from cohort.worker.ticker import is_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.run", description=__doc__.splitlines()[0])
    parser.add_argument("topology", nargs="?", help="the topology YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value by its dotted path, e.g. edges.0.temperature=2 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start Ray here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the topology's, else sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="where Ray Train keeps the run's checkpoints (default: ~/ray_results/cohort)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue a stopped run from its last checkpoint: an MLflow run id or its storage folder")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard (on 127.0.0.1 only) when Ray is started here")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    parser.add_argument("--register", action="append", default=[], metavar="PEER=NAME",
                        help="register the trained peer in the MLflow Model Registry under NAME (repeatable)")
    add_display_options(parser)
    return parser.parse_args(argv)



# --------------------------------------------------------------------------- the plan, as shown


def describe_classes(plan: Plan) -> list[str]:
    """Training images per class, and the class groups, where the set is long-tailed or grouped."""
    info = plan.info
    if plan.groups is None and not plan.topology.data.long_tail:
        return []
    lines = [f"  training images per class: {', '.join(map(str, info.train_class_counts))}"]
    if plan.groups is not None:
        groups, names = plan.groups
        for index, name in enumerate(names):
            members = [c for c in range(info.num_classes) if int(groups[c]) == index]
            images = sum(info.train_class_counts[c] for c in members)
            lines.append(f"  group {name}: {len(members)} classes ({images} images): {_ranges(members)}")
    return lines


def _ranges(classes: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    parts, start = [], None
    for index, cls in enumerate(classes):
        if start is None:
            start = cls
        if index + 1 == len(classes) or classes[index + 1] != cls + 1:
            parts.append(f"{start}-{cls}" if cls != start else f"{cls}")
            start = None
    return ", ".join(parts)


def describe_calibration(topology, info) -> str:
    """What the plan says about the validation split and temperature scaling."""
    if not info.val_size:
        return "temperature scaling: off (no validation split; set data.val_fraction, e.g. 0.1)"
    every = topology.train.calibrate_every
    when = f"every {every} epochs and after the last" if every else "after the last epoch"
    return (f"validation split: {info.val_size} training images held out (data.val_fraction "
            f"{topology.data.val_fraction:g}); temperature scaling fitted on it {when}, for every peer and the ensemble")


def describe_plan(plan: Plan) -> str:
    topology, info = plan.topology, plan.info
    # Columns as wide as their longest name, and a space after it: long names never run together.
    width = max(14, max(len(peer) for peer in topology.peer_names) + 1)
    model_width = max(16, max(len(config.model) for config in topology.peers.values()) + 1)
    lines = [
        f"{topology.name}: {len(topology.peers)} peer{'s' if len(topology.peers) > 1 else ''} on {info.name} "
        f"({info.train_size} train / {info.test_size} test images, {info.num_classes} classes), "
        f"{topology.train.epochs} epochs, batch {topology.data.batch_size}, seed {topology.seed}"
        + (f", {topology.train.precision}" if topology.train.precision != "fp32" else ""),
        *(f"  note: {note}" for note in info.notes),
        *describe_classes(plan),
        f"  {describe_calibration(topology, info)}",
        "",
        f"  {'rank':<5}{'peer':<{width}}{'model':<{model_width}}{'params':>10}{'GFLOPs':>9}{'threads':>9}  optimizer",
    ]
    for rank, peer in enumerate(topology.peer_names):
        config = topology.peers[peer]
        optimizer = topology.optimizer_for(peer)
        training = "frozen, from " + str(config.checkpoint) if config.frozen else (
            f"{optimizer.name} lr={optimizer.lr:g} wd={optimizer.weight_decay:g}")
        lines.append(f"  {rank:<5}{peer:<{width}}{config.model:<{model_width}}{plan.parameters[peer]:>10,}"
                     f"{plan.compute[peer] / 1e9:>9.3f}"
                     f"{plan.threads[peer]:>9}  {training}")
    lines += ["", "  edges (receiver <- sender: loss, weight, parameters)"]
    if not topology.edges:
        lines.append("    none: every peer trains on its labels alone")
    for edge in topology.edges:
        params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in edge.params.items())
        extra = f" reduce={edge.reduce}" + (f" warmup={edge.warmup}" if edge.warmup else "")
        lines.append(f"    {edge.to} <- {'+'.join(edge.senders)}: {edge.loss}, weight {edge.weight:g}, {params}{extra}")
    lines += describe_gates(topology)
    resources = topology.resources
    gpus = resources.gpus_per_worker
    backend = exchange_backend(resources.use_gpu, gpus)
    lines += [
        "",
        f"  resources: {topology.num_workers} Ray Train workers x {plan.cpus_per_peer:g} CPU"
        f"{f' + {gpus:g} GPU' if gpus else ''}; torch threads in proportion to each peer's compute "
        "(GFLOPs: one step, per sample)"
        + "".join(f", {text}" for text in placement_constraints(resources)),
        f"  exchange: {backend.name}{' on host copies' if backend.host_copies else ''} ({backend.reason})",
        *describe_grid(topology),
        f"  tracking: experiment {topology.experiment!r} at {plan.tracking_uri}",
    ]
    return "\n".join(lines)


def describe_gates(topology) -> list[str]:
    """The gates: per step, from the exchanged logits, which edges switch off and who pauses (cohort.gates)."""
    if not topology.gates:
        return []
    lines = ["", "  gates (decided every step from the exchanged logits; firing switches the teacher's edges from "
                 "the student off, and a teacher all of whose gates fire takes no optimizer step)"]
    for gate in topology.gates:
        params = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in gate.params.items())
        edges = [edge.label for edge in topology.incoming_edges(gate.teacher) if edge.senders == (gate.student,)]
        lines.append(f"    {gate.rule}: teacher {gate.teacher}, student {gate.student}{params}; switches "
                     + (", ".join(edges) if edges else "no edge (pauses only)"))
    return lines


def describe_grid(topology) -> list[str]:
    """The worker grid, where peers have replicas: rank -> peer, replica (= data shard), device."""
    if topology.replicas == 1:
        return []
    gpus = topology.resources.gpus_per_worker
    device = "CPU" if not gpus else ("own GPU" if gpus >= 1 else f"{gpus:g} of a shared GPU")
    lines = [f"  worker grid: {topology.replicas} replicas per peer, each batch of {topology.data.batch_size} split "
             f"into {topology.replicas} shards; logits exchanged per shard, gradients averaged per peer (DDP)",
             f"    {'rank':<6}{'peer':<14}{'replica/shard':<15}device"]
    for slot in worker_grid(topology.peer_names, topology.replicas):
        frozen = " (frozen: no DDP)" if topology.peers[slot.peer].frozen else ""
        lines.append(f"    {slot.rank:<6}{slot.peer:<14}{slot.shard:<15}{device}{frozen}")
    lines.append("  batch norm: " + "; ".join(f"{peer}: {batch_norm_text(topology, peer)}" for peer in topology.peer_names))
    return lines


def batch_norm_text(topology, peer: str) -> str:
    """How a peer with replicas normalizes its BatchNorm layers (cohort.worker.syncbn)."""
    config = topology.peers[peer]
    if config.frozen:
        return "running statistics (frozen)"
    if not config.sync_batchnorm:
        return "per-shard statistics (sync_batchnorm: false)"
    return f"synchronized over its {topology.replicas} replicas"


def placement_constraints(resources) -> list[str]:
    return ([f"accelerator {resources.accelerator_type}"] if resources.accelerator_type else []) + [
        f"node label {key}={value}" for key, value in resources.node_labels.items()]



# --------------------------------------------------------------------------- display


def summary_table(plan: Plan, final: dict[str, Any]) -> str:
    """The end of a run: each peer's final test metrics; with temperature scaling, the ECE and NLL
    after it and the fitted temperature beside them."""
    topology = plan.topology
    scaled = any(metric_key(peer, "ece_ts") in final for peer in evaluated(topology))
    header = f"{'peer':<14}{'model':<16}{'params':>10}{'top-1':>9}{'ECE':>8}{'NLL':>8}{'Brier':>8}"
    rows = [header + (f"{'T':>7}{'ECE(TS)':>9}{'NLL(TS)':>9}" if scaled else "")]
    for peer in evaluated(topology):
        model = topology.peers[peer].model if peer != ENSEMBLE else "(mean of probs)"
        params = f"{plan.parameters[peer]:,}" if peer in plan.parameters else ""
        acc, ece, nll, brier = (final[metric_key(peer, metric)] for metric in ("acc", "ece", "nll", "brier"))
        row = f"{peer:<14}{model:<16}{params:>10}{100 * acc:>8.1f}%{ece:>8.4f}{nll:>8.4f}{brier:>8.4f}"
        if scaled:
            values = [final.get(metric_key(peer, key), float("nan")) for key in ("ts_temperature", "ece_ts", "nll_ts")]
            row += f"{values[0]:>7.2f}{values[1]:>9.4f}{values[2]:>9.4f}"
        rows.append(row)
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def in_file(error: CohortError, path: str) -> CohortError:
    """A key-located error found after loading (checkpoints, data, groups), named with its file."""
    if error.where and not error.where.startswith(Path(path).name) and error.where[0].islower():
        return CohortError(error.message, f"{Path(path).name}: {error.where}")
    return error


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CohortError as error:
        raise (in_file(error, args.topology) if args.topology else error) from None


def _run(args: argparse.Namespace) -> int:
    from cohort.topology import load_topology
    from cohort.tracking.tracker import resolve_uri

    if args.resume:
        return resume(args)
    if not args.topology:
        raise CohortError("a topology file is needed (or --resume RUN)")
    topology = load_topology(args.topology, args.overrides)
    registrations = parse_registrations(args.register, topology)
    tracking_uri = resolve_uri(args.tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), tracking_uri)
    if args.dry_run:
        plan = make_plan(topology, tracking_uri, os.cpu_count() or 1, download=False)
        print(describe_plan(plan))
        print("\nresolved topology:\n" + "\n".join("  " + line for line in topology.to_yaml().splitlines()))
        return 0

    plan, tracker, cluster, marks = plan_while_ray_starts(args, topology, tracking_uri)
    plan = fit_cluster(plan, cluster, cluster_node_labels())
    display = Display(mode_of(args))
    display.info(describe_plan(plan))

    run_name = f"{topology.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_location(args.storage)
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



def resume(args: argparse.Namespace) -> int:
    """Continue a stopped run from its last checkpoint, in the same MLflow run."""
    from cohort.config.loader import read_yaml
    from cohort.topology import topology_from_dict
    from cohort.tracking.tracker import resolve_uri

    if args.topology or args.overrides or args.dry_run:
        raise CohortError("--resume takes the run's own topology: give no topology file, --set or --dry-run")
    reference = Path(os.path.expanduser(args.resume))
    if (reference / RUN_FILE).is_file():
        saved = json.loads((reference / RUN_FILE).read_text())
        run_id, tracking_uri = saved["run_id"], args.tracking_uri or saved["tracking_uri"]
    else:
        run_id, tracking_uri = args.resume, resolve_uri(args.tracking_uri)
    from cohort.tracking.tracker import existing_store_client

    client = existing_store_client(tracking_uri, f"--resume {args.resume}")
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - unknown id, unreachable store: the same answer
        raise CohortError(f"--resume {args.resume}: no such MLflow run in {tracking_uri} "
                          "(give a run id and --tracking-uri, or the run's storage folder)") from None
    if run.info.status == "FINISHED":
        raise CohortError(f"--resume {args.resume}: run {run_id} has already finished")
    storage, run_name = run.data.tags.get("cohort.ray_storage"), run.data.tags.get("cohort.ray_name")
    if not storage or ("://" not in storage and not (Path(storage) / run_name).is_dir()):
        raise CohortError(f"--resume {args.resume}: the run's checkpoints ({storage}/{run_name}) are gone")
    topology_file = client.download_artifacts(run_id, "topology.yaml")
    topology = topology_from_dict(read_yaml(topology_file), "topology.yaml")
    registrations = parse_registrations(args.register, topology)
    history = client.get_metric_history(run_id, metric_key(topology.peer_names[0], "acc"))
    logged = max((metric.step for metric in history), default=0)
    plan, tracker, cluster, marks = plan_while_ray_starts(args, topology, tracking_uri)
    tracker.run_id = run_id
    plan = fit_cluster(plan, cluster, cluster_node_labels())
    client.update_run(run_id, status="RUNNING")
    display = Display(mode_of(args))
    display.info(f"resuming MLflow run {run_id} ({topology.name}) after epoch {logged} of {topology.train.epochs}")
    display.json("start", run_id=run_id, experiment=topology.experiment, epochs=topology.train.epochs, after=logged)
    return train(plan, tracker, storage, run_name, logged_epochs=logged, marks=marks, registrations=registrations,
                 display=display)



def train(plan: Plan, tracker, storage: str, run_name: str, logged_epochs: int,
          marks: dict[str, float] | None = None, registrations: dict[str, str] | None = None,
          display: Display | None = None) -> int:
    """Fit the cohort, show and log each epoch once, and log the final artifacts: the weights,
    each trained peer as an MLflow model (registered where ``registrations``, {peer: name}, says)."""
    from ray.util.queue import Queue

    from cohort.driver.startup import describe_startup, startup_breakdown

    topology = plan.topology
    progress = Queue()
    display = display or Display("log")
    # Rank 0's step counter feeds the bar inside an epoch: sent only where a terminal draws it.
    trainer = make_trainer(topology, plan.cpus_per_peer, plan.threads, storage, run_name, progress=progress,
                           dataset=plan.dataset, weights=plan.weights, live_steps=display.mode == "tty")
    epochs = EpochDisplay(display, evaluated(topology), topology.train.epochs, done=logged_epochs)
    started = time.perf_counter()
    final: dict[str, Any] = {}
    thread, outcome = fit_in_background(trainer)
    # Ctrl-C is taken between two MLflow writes, never in the middle of one (cohort.config.errors).
    with deferred_interrupt() as interrupted:
        while (thread.is_alive() or not progress.empty()) and not interrupted.is_set():
            try:
                report = progress.get(timeout=0.5)
            except queue.Empty:
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
                    display.info(describe_startup(breakdown))
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
        raise KeyboardInterrupt
    thread.join()
    if "error" in outcome:
        tracker.finish("FAILED")
        raise CohortError(f"training failed: {failure_reason(outcome['error'])} "
                          f"(MLflow run {tracker.run_id} marked FAILED)")

    result = outcome["result"]
    log_final_artifacts(tracker, result, final)
    try:
        models = log_models(plan, tracker, result, final, ensemble=ENSEMBLE in (registrations or {}))
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
    display.summary(f"\nMLflow run {tracker.run_id} in experiment {topology.experiment!r} at {plan.tracking_uri}")
    display.summary(f"  look at it with: mlflow ui --backend-store-uri {plan.tracking_uri}")
    if models:
        display.summary(f"  trained peers as MLflow models: {model_uri(tracker.run_id, '<peer>')} ({', '.join(models)})")
    for line in registered:
        display.summary("  " + line)
    display.json("done", run_id=tracker.run_id, seconds=round(seconds, 1), epoch=final.get("epoch"),
                 metrics={key: value for key, value in final.items() if isinstance(value, (int, float))},
                 models=list(models or []), registered=registered)
    return 0


def log_final_artifacts(tracker, result, final: dict[str, Any]) -> None:
    from cohort.tracking.tracker import flat_metrics, log_checkpoint_artifacts

    tracker.log_json({"epoch": final.get("epoch"), **flat_metrics(final)}, "final_metrics.json")
    if final.get(cohort_key("workers")):
        tracker.log_json(final[cohort_key("workers")], "workers.json")  # rank -> peer, replica, node, device
    log_checkpoint_artifacts(tracker, result.checkpoint)



def log_models(plan: Plan, tracker, result, final: dict[str, Any], ensemble: bool = False) -> dict[str, dict[str, float]]:
    """Each trained peer as ``models/<peer>`` (cohort.tracking.logged_models), and with ``ensemble`` the
    cohort's ensemble as ``models/ensemble``: {peer: its test metrics}."""
    from cohort.worker.peer import read_weights

    topology = plan.topology
    peers = exported_peers(topology) + ([ENSEMBLE] if ensemble else [])
    if result.checkpoint is None or not peers:
        return {}
    needed = topology.peer_names if ensemble else peers
    with result.checkpoint.as_directory() as folder:
        weights = {peer: read_weights(str(Path(folder) / f"{peer}.pt"), f"weights/{peer}.pt") for peer in needed}
    log_peer_models(tracker, topology, plan.info, plan.dataset, plan.groups, weights, final, peers=peers)
    names = test_metric_names(topology, plan.info, plan.groups)
    return {peer: peer_test_metrics(final, peer, names) for peer in peers}


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
