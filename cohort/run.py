"""``python -m cohort.run TOPOLOGY.yaml``: train a cohort, one Ray Train worker per peer.

The driver validates the topology and everything it points at before Ray starts, launches one
``TorchTrainer``, prints one line per epoch from the metrics rank 0 sends it, and is the single
MLflow writer of the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohort.errors import CohortError, first_line, run_command
from cohort.grid import exchange_backend, gpus_needed, worker_grid


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
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What a run will do, checked before anything starts."""

    topology: Any
    info: Any
    groups: Any  # (class -> group tensor, group names), or None
    parameters: dict[str, int]
    cpus_per_peer: float
    compute: dict[str, float]  # FLOPs of one training step per sample, per peer (cohort.placement)
    threads: dict[str, int]  # torch threads per peer, in proportion to its compute
    tracking_uri: str
    # The loaded dataset, handed to every worker through Ray's object store (None for --dry-run).
    dataset: Any = dataclasses.field(default=None, repr=False, compare=False)
    # The peers' checkpoints as read here, {peer: state_dict}, sent to the workers the same way.
    weights: Any = dataclasses.field(default=None, repr=False, compare=False)


def fetch_checkpoints(topology, tracking_uri: str):
    """The topology with each ``mlflow:EXPERIMENT/PEER`` checkpoint pinned to the run it means
    (``runs:/RUN_ID/weights/PEER.pt``), and every ``runs:/`` reference checked. Nothing is
    downloaded: ``load_checkpoints`` reads the weights, once, for the workers."""
    from cohort.tracking import is_mlflow_checkpoint, resolve_checkpoint

    peers = {}
    for name, peer in topology.peers.items():
        if is_mlflow_checkpoint(peer.checkpoint):
            reference = resolve_checkpoint(peer.checkpoint, tracking_uri, f"peers.{name}.checkpoint")
            peer = peer.model_copy(update={"checkpoint": reference})
        peers[name] = peer
    return topology.model_copy(update={"peers": peers})


def load_checkpoints(topology, tracking_uri: str) -> dict[str, Any]:
    """Every peer checkpoint's state_dict (``weights_only``), read here once: files from their
    path, MLflow references through a temporary download. The workers receive these through Ray's
    object store and never open a checkpoint path, which on a cluster only the driver may have."""
    import tempfile

    from cohort.tracking import fetch_checkpoint, is_mlflow_checkpoint
    from cohort.worker import read_weights

    weights = {}
    with tempfile.TemporaryDirectory(prefix="cohort-checkpoints-") as folder:
        for name, peer in topology.peers.items():
            if not peer.checkpoint:
                continue
            where = f"peers.{name}.checkpoint"
            path = (fetch_checkpoint(peer.checkpoint, tracking_uri, where, folder)
                    if is_mlflow_checkpoint(peer.checkpoint) else peer.checkpoint)
            weights[name] = read_weights(path, where, name=peer.checkpoint)
    return weights


def make_plan(topology, tracking_uri: str | None, available_cpus: float, download: bool = True) -> Plan:
    from cohort.datasets import describe_dataset, load_dataset
    from cohort.models import count_parameters
    from cohort.placement import peer_threads, step_flops
    from cohort.tracking import resolve_uri
    from cohort.worker import build_peer, cohort_groups

    uri = resolve_uri(tracking_uri or topology.tracking.uri)
    dataset = load_dataset(topology.data) if download else None
    info = dataset.info if dataset is not None else describe_dataset(topology.data)
    weights = load_checkpoints(topology, uri)
    # Building every peer here catches unknown models, bad checkpoints and class-count mismatches
    # before any worker starts.
    models = {peer: build_peer(topology, peer, info, weights.get(peer)) for peer in topology.peer_names}
    parameters = {peer: count_parameters(model) for peer, model in models.items()}
    compute = {peer: step_flops(model, info.input_size, topology.peers[peer].frozen) if info.input_size
               else float(parameters[peer]) for peer, model in models.items()}
    cpus = cpus_per_peer(topology, available_cpus)
    return Plan(topology, info, cohort_groups(topology, info), parameters, cpus, compute, peer_threads(compute, cpus),
                uri, dataset, weights)


def cpus_per_peer(topology, available_cpus: float) -> float:
    """CPUs per worker: the topology's setting, else the CPUs shared by the workers, at most one each."""
    if topology.resources.cpus_per_peer is not None:
        return topology.resources.cpus_per_peer
    return max(0.01, min(1.0, int(available_cpus / topology.num_workers * 100) / 100))


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
    """How a peer with replicas normalizes its BatchNorm layers (cohort.syncbn)."""
    config = topology.peers[peer]
    if config.frozen:
        return "running statistics (frozen)"
    if not config.sync_batchnorm:
        return "per-shard statistics (sync_batchnorm: false)"
    return f"synchronized over its {topology.replicas} replicas"


def placement_constraints(resources) -> list[str]:
    return ([f"accelerator {resources.accelerator_type}"] if resources.accelerator_type else []) + [
        f"node label {key}={value}" for key, value in resources.node_labels.items()]


# --------------------------------------------------------------------------- Ray


def check_address(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself would wait and retry for a long time)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CohortError(f"--address {address!r}: expected 'auto' or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise CohortError(f"--address {address!r}: no Ray cluster reachable there ({error.strerror or error})") from None


# Ray's token authentication. A driver sends the cluster's token only in RAY_AUTH_MODE=token, which
# Ray turns on by itself for a new local cluster and for `--address auto` when a token is at hand,
# but never for an explicit HOST:PORT: cohort does the same for HOST:PORT as Ray does for auto.
AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"
COPY_TOKEN = ("copy the head node's ~/.ray/auth_token to ~/.ray/auth_token here, "
              "or set RAY_AUTH_TOKEN to its contents")


def token_source(env: dict[str, str], home: Path) -> str | None:
    """Where Ray's driver takes its auth token from, in Ray's order: $RAY_AUTH_TOKEN, else the
    file $RAY_AUTH_TOKEN_PATH (when set, the only file Ray reads), else ~/.ray/auth_token; None
    when there is no token."""
    if env.get(AUTH_TOKEN, "").strip():
        return "$RAY_AUTH_TOKEN"
    named = env.get(AUTH_TOKEN_PATH)
    path = Path(os.path.expanduser(named)) if named else home / DEFAULT_TOKEN_FILE
    try:
        found = path.is_file() and bool(path.read_text().strip())
    except OSError:
        found = False
    return (f"$RAY_AUTH_TOKEN_PATH ({named})" if named else "~/.ray/auth_token") if found else None


def joins_by_host_port(address: str | None) -> bool:
    return bool(address) and address != "auto" and not address.startswith("ray://")


def join_auth_env(address: str | None, env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment the driver needs to join ``address``: RAY_AUTH_MODE=token when it joins a
    HOST:PORT, a token is at hand and the mode is not set (an explicit mode is respected)."""
    if not joins_by_host_port(address) or AUTH_MODE in env or token_source(env, home) is None:
        return {}
    return {AUTH_MODE: "token"}


def auth_refused_message(address: str, env: dict[str, str], home: Path) -> str:
    """One line for a cluster that refused this driver for its auth token (or its lack of one)."""
    source = token_source(env, home)
    if env.get(AUTH_MODE, "token").lower() != "token":
        return (f"the cluster at {address} requires a Ray auth token, and RAY_AUTH_MODE={env[AUTH_MODE]} here: "
                f"unset RAY_AUTH_MODE (or set it to token) and {COPY_TOKEN}")
    if source is None:
        named = env.get(AUTH_TOKEN_PATH)
        where = (f"$RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH ({named}: missing or empty)" if named
                 else "$RAY_AUTH_TOKEN or ~/.ray/auth_token")
        return f"the cluster at {address} requires a Ray auth token: none found in {where} ({COPY_TOKEN})"
    return (f"the cluster at {address} refused the Ray auth token from {source}: it is not the cluster's "
            f"({COPY_TOKEN})")


def token_accepted(address: str, send_token: bool, timeout: float = 5.0) -> bool | None:
    """Whether the cluster's GCS at ``address`` accepts what ray.init will send it: this machine's
    auth token, or none. One gRPC call, where ray.init retries for 20 s and then says only 'Failed
    to connect'. None when the answer is not about authentication."""
    import grpc
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = ()
    if send_token:
        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        try:
            metadata = tuple(loader.get_token_for_http_header(ignore_auth_mode=True).items())
        except Exception:  # noqa: BLE001 - e.g. RAY_AUTH_TOKEN_PATH names a missing file: no token
            pass
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            return False if error.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return True


def prepare_join(address: str) -> None:
    """Set this driver up to join HOST:PORT as Ray sets it up for ``auto``; refuse, in one line, a
    token the cluster does not accept. A cluster that asks for no token is joined as it is: the
    driver's auth mode (and Ray's cached config) change only for one that does."""
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        if token_accepted(address, send_token=False) is not False:
            return  # no token asked for (or an answer not about auth, which ray.init reports)
        updates = join_auth_env(address, dict(os.environ), Path.home())
        if not updates:
            raise CohortError(auth_refused_message(address, dict(os.environ), Path.home()))
        os.environ.update(updates)
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config: let it see the mode, as Ray itself does
    if token_accepted(address, send_token=True) is False:
        raise CohortError(auth_refused_message(address, dict(os.environ), Path.home()))


def start_ray(address: str | None, verbose: bool, dashboard: bool = False) -> dict[str, float]:
    """Start or join Ray quietly; return the cluster's resources.

    A Ray started here keeps its dashboard off unless asked for, and then binds it to 127.0.0.1;
    Ray's token authentication (on by default for a new local cluster) is left as it is. A cluster
    joined by HOST:PORT gets this machine's token as ``auto`` does (``prepare_join``).
    """
    import logging

    import ray

    # Ray Train's controller polls its workers this often; its 2 s default paces short epochs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not address:
        # A Ray started here runs its workers at nice 15, below every other process: next to any
        # other load (even Ray's own agents and this driver) the peers then stepped at half speed
        # on 2 cores. The peers are the computation: they run at a plain training script's priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Two of Ray Train's helper processes serve nothing on a Ray of one machine: the watcher of
        # cloud nodes' preemption notices, and the per-worker metrics for a dashboard (off unless
        # asked for). Every Ray worker process wakes 100 times a second; on a small machine their
        # start-up and wake-ups come out of the peers' cores (README, Performance).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not dashboard:
            os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    quiet = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address:
            check_address(address)
            if joins_by_host_port(address):
                prepare_join(address)
            ray.init(address=address, **quiet)
        elif not ray.is_initialized():
            ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", **quiet)
    except CohortError:
        raise
    except Exception as error:  # noqa: BLE001 - ray raises several kinds for the same problem
        raise CohortError(f"cannot start or join Ray{f' at {address!r}' if address else ''}: {first_line(error)}") from None
    return ray.cluster_resources()


def make_trainer(topology, cpus_per_peer: float, threads: int | dict[str, int], storage: str | None, run_name: str,
                 progress=None, objective: str | None = None, callbacks: tuple = (), initial_checkpoint=None,
                 dataset=None, weights: dict[str, Any] | None = None):
    """The cohort's ``TorchTrainer``. ``dataset``: the loaded data, put once in Ray's object store for
    every worker (identical data for all, decoded once); without it each worker loads its own.
    ``weights``: {peer: state_dict} of the peers' checkpoints (``load_checkpoints``), each put in the
    object store for that peer's workers; a peer without them reads its checkpoint's path."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cohort.worker import train_cohort

    storage_path = storage_location(storage)
    resources = topology.resources
    gpus = resources.gpus_per_worker
    return TorchTrainer(
        train_cohort,
        train_loop_config={"topology": topology.to_dict(), "threads": threads, "progress": progress,
                           "objective": objective, "initial_checkpoint": initial_checkpoint,
                           "dataset": ray.put(dataset) if dataset is not None else None,
                           "weights": {peer: ray.put(state) for peer, state in (weights or {}).items()}},
        # One worker per peer and replica (cohort.grid). The worker wraps only a peer's own
        # replicas in DDP; nothing here does (peers are different networks).
        scaling_config=ScalingConfig(
            num_workers=topology.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": cpus_per_peer, **({"GPU": gpus} if gpus else {})},
            accelerator_type=resources.accelerator_type,
            label_selector=dict(resources.node_labels) or None,
        ),
        torch_config=TorchConfig(backend=exchange_backend(resources.use_gpu, gpus).name),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            # Restart the worker group from the last checkpoint when a worker dies; an infeasible
            # resource request would otherwise wait forever (controller_failure_limit=0).
            failure_config=FailureConfig(max_failures=topology.train.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=topology.train.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def fit_in_background(trainer) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="cohort-fit", daemon=True)
    thread.start()
    return thread, outcome


def failure_reason(error: BaseException) -> str:
    """The most useful line of a failed fit: a worker's CohortError if there is one."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CohortError):
            return str(current)
        cause = getattr(current, "cause", None)
        if isinstance(current, BaseException) and hasattr(current, "as_instanceof_cause"):
            try:
                pending.append(current.as_instanceof_cause())
            except Exception:  # noqa: BLE001
                pass
        for nested in (current.__cause__, current.__context__, cause):
            if isinstance(nested, BaseException):
                pending.append(nested)
        for value in (getattr(current, "worker_failures", None) or {}).values():
            if isinstance(value, BaseException):
                pending.append(value)
    text = str(error)
    for line in text.splitlines():
        if "CohortError:" in line:
            return line.split("CohortError:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


# --------------------------------------------------------------------------- display


def epoch_line(topology, report: dict[str, Any], seconds: float) -> str:
    width = len(str(topology.train.epochs))
    parts = [f"epoch {report['epoch']:>{width}}/{topology.train.epochs}"]
    for peer in topology.peer_names + ["ensemble"]:
        acc, ece = report.get(f"{peer}/acc"), report.get(f"{peer}/ece")
        if acc is not None:
            tail = report.get(f"{peer}/acc_tail", report.get(f"{peer}/acc_few"))
            parts.append(f"{peer} {100 * acc:5.1f}% ece {ece:.3f}" + (f" tail {100 * tail:.1f}%" if tail is not None
                                                                      and tail == tail else ""))
    parts.append(f"{seconds:.1f}s")
    return "  |  ".join(parts)


def summary_table(plan: Plan, final: dict[str, Any]) -> str:
    topology = plan.topology
    rows = [f"{'peer':<14}{'model':<16}{'params':>10}{'top-1':>9}{'ECE':>8}{'NLL':>8}{'Brier':>8}"]
    for peer in topology.peer_names + ["ensemble"]:
        model = topology.peers[peer].model if peer in topology.peers else "(mean of probs)"
        params = f"{plan.parameters[peer]:,}" if peer in plan.parameters else ""
        rows.append(f"{peer:<14}{model:<16}{params:>10}{100 * final[f'{peer}/acc']:>8.1f}%"
                    f"{final[f'{peer}/ece']:>8.4f}{final[f'{peer}/nll']:>8.4f}{final[f'{peer}/brier']:>8.4f}")
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
    from cohort.tracking import resolve_uri

    if args.resume:
        return resume(args)
    if not args.topology:
        raise CohortError("a topology file is needed (or --resume RUN)")
    topology = load_topology(args.topology, args.overrides)
    tracking_uri = resolve_uri(args.tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), tracking_uri)
    if args.dry_run:
        plan = make_plan(topology, tracking_uri, os.cpu_count() or 1, download=False)
        print(describe_plan(plan))
        print("\nresolved topology:\n" + "\n".join("  " + line for line in topology.to_yaml().splitlines()))
        return 0

    plan, tracker, cluster, marks = plan_while_ray_starts(args, topology, tracking_uri)
    plan = fit_cluster(plan, cluster, cluster_node_labels())
    print(describe_plan(plan), flush=True)

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
                      "test_size": plan.info.test_size, "notes": list(plan.info.notes),
                      "groups": {name: [c for c in range(plan.info.num_classes) if int(plan.groups[0][c]) == index]
                                 for index, name in enumerate(plan.groups[1])} if plan.groups else None},
                     "data.json")
    workers = f"{topology.num_workers} worker{'s' if topology.num_workers > 1 else ''}"
    print(f"\nMLflow run {run_id} (experiment {topology.experiment!r}); starting {workers}...", flush=True)
    return train(plan, tracker, storage, run_name, logged_epochs=0, marks=marks)


DEFAULT_STORAGE = "~/ray_results/cohort"
RUN_FILE = "cohort_run.json"


def storage_location(storage: str | None) -> str:
    """An absolute path (runs and trials change directories), or a URI (``s3://…``) as given."""
    storage = storage or DEFAULT_STORAGE
    return storage if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def fit_cluster(plan: Plan, cluster: dict[str, float], node_labels: list[dict[str, str]] | None = None) -> Plan:
    """The plan with CPUs shared out over the Ray cluster; refused if the cluster is too small, or
    has no GPUs of the type or no node with the labels the topology asks for (``node_labels``:
    every node's labels, where known)."""
    from cohort.placement import peer_threads

    topology = plan.topology
    resources = topology.resources
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    shared = cpus_per_peer(topology, cpus)
    plan = dataclasses.replace(plan, cpus_per_peer=shared, threads=peer_threads(plan.compute, shared))
    workers = workers_text(topology)
    needed = plan.cpus_per_peer * topology.num_workers
    if needed > cpus + 1e-9:
        raise CohortError(f"the cohort needs {needed:g} CPUs ({workers} x {plan.cpus_per_peer:g}), "
                          f"the Ray cluster has {cpus:g}", "resources.cpus_per_peer")
    needed_gpus = gpus_needed(topology.num_workers, resources.gpus_per_worker)
    if resources.use_gpu and needed_gpus > gpus + 1e-9:
        each = "one each" if resources.gpus_per_worker >= 1 else f"{resources.gpus_per_worker:g} each"
        raise CohortError(f"the cohort needs {needed_gpus:g} GPUs ({workers}, {each}), the Ray cluster has "
                          f"{gpus:g} (--set resources.use_gpu=false to train on CPUs)",
                          "resources.gpus_per_peer" if resources.gpus_per_peer is not None else "resources.use_gpu")
    if resources.accelerator_type and f"accelerator_type:{resources.accelerator_type}" not in cluster:
        known = sorted(key.split(":", 1)[1] for key in cluster if key.startswith("accelerator_type:"))
        raise CohortError(f"no {resources.accelerator_type!r} GPUs in the Ray cluster "
                          f"(it has: {', '.join(known) or 'none'})", "resources.accelerator_type")
    wanted = dict(resources.node_labels)
    if wanted and node_labels is not None and not any(wanted.items() <= labels.items() for labels in node_labels):
        raise CohortError(f"no node of the Ray cluster has the labels {wanted}", "resources.node_labels")
    return plan


def workers_text(topology) -> str:
    peers = f"{len(topology.peers)} peer{'s' if len(topology.peers) > 1 else ''}"
    return f"{peers} x {topology.replicas} replicas" if topology.replicas > 1 else peers


def cluster_node_labels() -> list[dict[str, str]]:
    """The labels of the Ray cluster's live nodes."""
    import ray

    return [dict(node.get("Labels") or {}) for node in ray.nodes() if node.get("Alive")]


def resume(args: argparse.Namespace) -> int:
    """Continue a stopped run from its last checkpoint, in the same MLflow run."""
    from cohort.config.loader import read_yaml
    from cohort.topology import topology_from_dict
    from cohort.tracking import resolve_uri

    if args.topology or args.overrides or args.dry_run:
        raise CohortError("--resume takes the run's own topology: give no topology file, --set or --dry-run")
    reference = Path(os.path.expanduser(args.resume))
    if (reference / RUN_FILE).is_file():
        saved = json.loads((reference / RUN_FILE).read_text())
        run_id, tracking_uri = saved["run_id"], args.tracking_uri or saved["tracking_uri"]
    else:
        run_id, tracking_uri = args.resume, resolve_uri(args.tracking_uri)
    from cohort.tracking import existing_store_client

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
    history = client.get_metric_history(run_id, f"{topology.peer_names[0]}/acc")
    logged = max((metric.step for metric in history), default=0)
    plan, tracker, cluster, marks = plan_while_ray_starts(args, topology, tracking_uri)
    tracker.run_id = run_id
    plan = fit_cluster(plan, cluster, cluster_node_labels())
    client.update_run(run_id, status="RUNNING")
    print(f"resuming MLflow run {run_id} ({topology.name}) after epoch {logged} of {topology.train.epochs}",
          flush=True)
    return train(plan, tracker, storage, run_name, logged_epochs=logged, marks=marks)


def plan_while_ray_starts(args: argparse.Namespace, topology, tracking_uri: str):
    """The plan and the MLflow store, made in a thread while Ray starts (or is joined) in this one.

    Both take seconds: the plan imports torch, loads the data and builds every peer on one core,
    the MLflow store opens (or creates) its database, while Ray's own processes start on the
    others. A plan that fails (bad data, a checkpoint that does not fit) stops the Ray started
    for it, so that bad input still ends with one line and nothing left running.
    Returns (plan, tracker, cluster resources, start-up marks).
    """
    import ray

    from cohort.tracking import Tracker

    prepared: dict[str, Any] = {}

    def prepare() -> None:
        try:
            plan = make_plan(topology, tracking_uri, os.cpu_count() or 1)
            prepared["tracker"] = Tracker(plan.tracking_uri, topology.experiment)
            prepared["plan"] = plan
            import ray.train.torch  # noqa: F401 - needed next; imported here while Ray starts
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, raised there
            prepared["error"] = error

    already_running = ray.is_initialized()
    thread = threading.Thread(target=prepare, name="cohort-plan", daemon=True)
    thread.start()
    try:
        cluster, marks = timed_start_ray(args)
    except CohortError as error:
        prepared.setdefault("ray_error", error)
    thread.join()
    if "error" in prepared:  # the input's error first: it is the one to fix
        if not already_running and "ray_error" not in prepared:
            ray.shutdown()
        raise prepared["error"]
    if "ray_error" in prepared:
        raise prepared["ray_error"]
    return prepared["plan"], prepared["tracker"], cluster, marks


def timed_start_ray(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """``start_ray``, and the driver's start-up marks (cohort.startup)."""
    from cohort.startup import driver_marks, process_started

    ray_start = time.time()
    cluster = start_ray(args.address, args.verbose, args.dashboard)
    return cluster, driver_marks(process_started(), ray_start, time.time())


def train(plan: Plan, tracker, storage: str, run_name: str, logged_epochs: int,
          marks: dict[str, float] | None = None) -> int:
    """Fit the cohort, print and log each epoch once, and log the final artifacts."""
    from ray.util.queue import Queue

    from cohort.startup import describe_startup, startup_breakdown

    topology = plan.topology
    progress = Queue()
    trainer = make_trainer(topology, plan.cpus_per_peer, plan.threads, storage, run_name, progress=progress,
                           dataset=plan.dataset, weights=plan.weights)
    started = last = time.perf_counter()
    final: dict[str, Any] = {}
    thread, outcome = fit_in_background(trainer)
    try:
        while thread.is_alive() or not progress.empty():
            try:
                report = progress.get(timeout=0.5)
            except queue.Empty:
                continue
            final = report
            if marks is not None:
                breakdown = startup_breakdown(marks, {peer: report.get(f"{peer}/startup") or {}
                                                      for peer in topology.peer_names})
                if breakdown:
                    marks = None  # once per command
                    print(describe_startup(breakdown), flush=True)
                    report = {**report, **{f"cohort/startup/{part}_s": value for part, value in breakdown.items()}}
            # After a restart the epochs since the last checkpoint come again: log each once.
            if report["epoch"] <= logged_epochs:
                continue
            logged_epochs = report["epoch"]
            now = time.perf_counter()
            print(epoch_line(topology, report, now - last), flush=True)
            last = now
            tracker.log_epoch(report)
        thread.join()
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        print(f"interrupted: continue with python -m cohort.run --resume {tracker.run_id}", file=sys.stderr)
        raise
    if "error" in outcome:
        tracker.finish("FAILED")
        raise CohortError(f"training failed: {failure_reason(outcome['error'])} "
                          f"(MLflow run {tracker.run_id} marked FAILED)")

    result = outcome["result"]
    log_final_artifacts(tracker, result, final)
    tracker.finish("FINISHED")
    print(f"\ndone in {time.perf_counter() - started:.0f}s\n")
    print(summary_table(plan, final))
    print(f"\nMLflow run {tracker.run_id} in experiment {topology.experiment!r} at {plan.tracking_uri}")
    print(f"  look at it with: mlflow ui --backend-store-uri {plan.tracking_uri}")
    return 0


def log_final_artifacts(tracker, result, final: dict[str, Any]) -> None:
    from cohort.tracking import flat_metrics

    tracker.log_json({"epoch": final.get("epoch"), **flat_metrics(final)}, "final_metrics.json")
    if final.get("cohort/workers"):
        tracker.log_json(final["cohort/workers"], "workers.json")  # rank -> peer, replica, node, device
    if result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as folder:
        for path in sorted(Path(folder).iterdir()):
            if path.name.endswith((".state.pt", ".manifest.json")):
                continue  # training state for restarts, not results
            if path.suffix == ".pt":
                tracker.log_file(path, "weights")
            elif path.suffix in (".png", ".json"):
                tracker.log_file(path, "reliability")



def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
