"""The cohort driver's library: the plan (checked before anything starts), the checkpoints it reads
once for the workers, the ``TorchTrainer`` of a cohort, fitting it in the background, and why a fit
failed. ``cohort.run`` (one run) and ``cohort.tuning.sweep`` (Tune trials) drive cohorts with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cohort.config.errors import CohortError
from cohort.datasets import DatasetInfo
from cohort.driver.cluster import started_here, timed_start_ray
from cohort.topology import Topology
from cohort.worker.grid import exchange_backend, gpus_needed


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a run will do, checked before anything starts."""

    topology: Topology
    info: DatasetInfo
    groups: Any  # (class -> group tensor, group names), or None
    parameters: dict[str, int]
    cpus_per_peer: float
    compute: dict[str, float]  # FLOPs of one training step per sample, per peer (cohort.driver.placement)
    threads: dict[str, int]  # torch threads per peer, in proportion to its compute
    tracking_uri: str
    # The loaded dataset, handed to every worker through Ray's object store (None for --dry-run).
    dataset: Any = dataclasses.field(default=None, repr=False, compare=False)
    # The peers' checkpoints as read here, {peer: state_dict}, sent to the workers the same way.
    weights: Any = dataclasses.field(default=None, repr=False, compare=False)
    # What each peer sends per step when more than logits travel (cohort.worker.payload), else None.
    payload: Any = None
    # Who makes the training batches: "peers" (every worker its own) or "producer" (one per node).
    pipeline: str = "peers"


def fetch_checkpoints(topology: Topology, tracking_uri: str):
    """The topology with each ``mlflow:EXPERIMENT/PEER`` checkpoint pinned to the run it means
    (``runs:/RUN_ID/weights/PEER.pt``), and every ``runs:/`` reference checked. Nothing is
    downloaded: ``load_checkpoints`` reads the weights, once, for the workers."""
    from cohort.tracking.tracker import is_mlflow_checkpoint, resolve_checkpoint

    peers = {}
    for name, peer in topology.peers.items():
        if is_mlflow_checkpoint(peer.checkpoint):
            reference = resolve_checkpoint(peer.checkpoint, tracking_uri, f"peers.{name}.checkpoint")
            peer = peer.model_copy(update={"checkpoint": reference})
        peers[name] = peer
    return topology.model_copy(update={"peers": peers})


def load_checkpoints(topology: Topology, tracking_uri: str) -> dict[str, Any]:
    """Every peer checkpoint's state_dict (``weights_only``), read here once: files from their
    path, MLflow references through a temporary download. The workers receive these through Ray's
    object store and never open a checkpoint path, which on a cluster only the driver may have."""
    import tempfile

    from cohort.tracking.tracker import fetch_checkpoint, is_mlflow_checkpoint
    from cohort.worker.peer import read_weights

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


def make_plan(topology: Topology, tracking_uri: str | None, available_cpus: float, download: bool = True) -> Plan:
    from cohort.datasets import describe_dataset, load_dataset
    from cohort.datasets.producer import data_pipeline
    from cohort.datasets.sampling import check_sampler
    from cohort.driver.placement import peer_threads, step_flops
    from cohort.models import count_parameters
    from cohort.tracking.tracker import resolve_uri
    from cohort.worker.peer import build_peer, cohort_groups
    from cohort.worker.representations import check_representations

    uri = resolve_uri(tracking_uri or topology.tracking.uri)
    dataset = load_dataset(topology.data, topology.seed) if download else None
    info = dataset.info if dataset is not None else describe_dataset(topology.data)
    weights = load_checkpoints(topology, uri)
    # Building every peer here catches unknown models, bad checkpoints and class-count mismatches
    # before any worker starts.
    models = {peer: build_peer(topology, peer, info, weights.get(peer)) for peer in topology.peer_names}
    parameters = {peer: count_parameters(model) for peer, model in models.items()}
    compute = {peer: step_flops(model, info.input_size, topology.peers[peer].frozen) if info.input_size
               else float(parameters[peer]) for peer, model in models.items()}
    check_sampler(info, topology.data.batch_size, topology.data.sampler)
    payload = check_representations(topology, models, info.input_size, info.num_classes)
    cpus = cpus_per_peer(topology, available_cpus)
    return Plan(topology=topology, info=info, groups=cohort_groups(topology, info), parameters=parameters,
                cpus_per_peer=cpus, compute=compute, threads=peer_threads(compute, cpus), tracking_uri=uri,
                dataset=dataset, weights=weights, payload=payload, pipeline=data_pipeline(topology, info))


def cpus_per_peer(topology: Topology, available_cpus: float) -> float:
    """CPUs per worker: the topology's setting, else the CPUs shared by the workers, at most one each."""
    if topology.resources.cpus_per_peer is not None:
        return topology.resources.cpus_per_peer
    return max(0.01, min(1.0, int(available_cpus / topology.num_workers * 100) / 100))



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
    from cohort.driver.placement import peer_threads

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


def workers_text(topology: Topology) -> str:
    peers = f"{len(topology.peers)} peer{'s' if len(topology.peers) > 1 else ''}"
    return f"{peers} x {topology.replicas} replicas" if topology.replicas > 1 else peers



def plan_while_ray_starts(args: argparse.Namespace, topology: Topology, tracking_uri: str):
    """The plan and the MLflow store, made in a thread while Ray starts (or is joined) in this one.

    Both take seconds: the plan imports torch, loads the data and builds every peer on one core,
    the MLflow store opens (or creates) its database, while Ray's own processes start on the
    others. A plan that fails (bad data, a checkpoint that does not fit) stops the Ray started
    for it, so that bad input still ends with one line and nothing left running.
    Returns (plan, tracker, cluster resources, start-up marks).
    """
    import ray

    from cohort.tracking.tracker import Tracker

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



def make_trainer(topology: Topology, cpus_per_peer: float, threads: int | dict[str, int], storage: str | None, run_name: str,
                 progress=None, objective: str | None = None, callbacks: tuple = (), initial_checkpoint=None,
                 dataset=None, weights: dict[str, Any] | None = None, train_loop=None, live_steps: bool = False,
                 pipeline: str | None = None, abortable: bool = False,
                 resource_requests: bool | None = None):
    """The cohort's ``TorchTrainer``. ``dataset``: the loaded data, put once in Ray's object store for
    every worker (identical data for all, decoded once), or already there (an ObjectRef: a sweep's
    trials share their driver's); without it each worker loads its own.
    ``weights``: {peer: state_dict} of the peers' checkpoints (``load_checkpoints``), each put in the
    object store for that peer's workers; a peer without them reads its checkpoint's path.
    ``train_loop``: what the workers run, default ``cohort.worker.loop.train_cohort`` (a benchmark wraps
    it to measure around it). ``live_steps``: rank 0 also sends its step counter through ``progress``
    a few times a second (``cohort.console.display.step_message``), for the driver's live display.
    ``pipeline``: who makes the training batches (``Plan.pipeline``), by default what ``data.pipeline``
    picks for the dataset the workers have; with ``producer`` the workers of each node share one
    (cohort.datasets.producer).
    ``abortable``: the controller puts its handle in ``progress`` as it starts, for ``abort_fit``.
    ``resource_requests``: the fit passes its resources on to the cluster's autoscaler, as Ray Train
    does; by default unless this process started the Ray (``started_here``: one machine, no autoscaler;
    cohort.driver.trainer)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from cohort.driver.process_group import ProcessGroupConfig
    from cohort.driver.reclaim import readable
    from cohort.driver.trainer import cohort_trainer_class, controller_announcer_class
    from cohort.worker.loop import train_cohort

    storage_path = storage_location(storage)
    resources = topology.resources
    gpus = resources.gpus_per_worker
    if resource_requests is None:
        resource_requests = not started_here()
    # Codistillation: the run's register of published weights (cohort.worker.board), ended with the fit.
    board = snapshot_board() if topology.exchange.snapshot else None
    return cohort_trainer_class(resource_requests, cleaner=not readable())(
        train_loop or train_cohort,
        train_loop_config={"topology": topology.to_dict(), "threads": threads, "progress": progress,
                           "live_steps": live_steps, "objective": objective, "initial_checkpoint": initial_checkpoint,
                           "dataset": dataset if dataset is None or isinstance(dataset, ray.ObjectRef) else ray.put(dataset),
                           "weights": {peer: ray.put(state) for peer, state in (weights or {}).items()},
                           "snapshot_board": board,
                           # Who makes the training batches (None: data.pipeline decides on the workers' data),
                           # and the run's key, by which each node's workers find their batch producer.
                           "pipeline": {"choice": pipeline, "key": uuid.uuid4().hex}},
        # One worker per peer and replica (cohort.worker.grid). The worker wraps only a peer's own
        # replicas in DDP; nothing here does (peers are different networks).
        scaling_config=ScalingConfig(
            num_workers=topology.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": cpus_per_peer, **({"GPU": gpus} if gpus else {})},
            accelerator_type=resources.accelerator_type,
            label_selector=dict(resources.node_labels) or None,
        ),
        # Ray's TorchConfig, without torch in the controller (cohort.driver.process_group).
        torch_config=ProcessGroupConfig(backend=exchange_backend(resources.use_gpu, gpus).name),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            # Restart the worker group from the last checkpoint when a worker dies; an infeasible
            # resource request would otherwise wait forever (controller_failure_limit=0).
            failure_config=FailureConfig(max_failures=topology.train.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=topology.train.keep_checkpoints),
            callbacks=[*callbacks, *([controller_announcer_class()(progress)] if abortable else [])],
        ),
        run_actors=[board] if board is not None else [],
    )


def snapshot_board():
    """The run's ``SnapshotBoard`` actor (no CPU of its own: a few calls per publication)."""
    import ray

    from cohort.worker.board import SnapshotBoard

    return ray.remote(num_cpus=0)(SnapshotBoard).remote()


# The driver's progress queue between two fits, by Ray session (``progress_queue``).
_IDLE_PROGRESS: dict[str, Any] = {}
_PROGRESS_LOCK = threading.Lock()


def _ray_session() -> str:
    import ray

    context = ray.get_runtime_context()
    return f"{context.gcs_address} {context.get_node_id()}"


def progress_queue():
    """The queue through which a fit's controller and workers send the driver their messages: a
    ``ray.util.queue.Queue``, whose actor is one more Python process to start (2–5 CPU-seconds on a
    2-core VM). A fit that has ended hands its queue back (``return_progress_queue``); the next fit
    of this process on the same Ray takes it, emptied: a notebook's fits one after another (or a
    test module's) start one such process, not one each. A fit running beside it gets a new one."""
    from ray.util.queue import Queue

    session = _ray_session()
    with _PROGRESS_LOCK:
        idle = _IDLE_PROGRESS.pop(session, None)
        _IDLE_PROGRESS.clear()  # a queue of an earlier Ray went with it
    if idle is not None:
        try:
            while not idle.empty():
                idle.get_nowait()
            return idle
        except Exception:  # noqa: BLE001 - its actor is gone: a new queue
            pass
    return Queue()


def return_progress_queue(queue) -> None:
    """Hand back the queue of a fit that has ended (nothing sends to it any more), for the next fit."""
    session = _ray_session()
    with _PROGRESS_LOCK:
        _IDLE_PROGRESS[session] = queue


# What ``fit_in_background`` puts into its ``wake`` queue when the fit has ended (``fit_messages`` skips it).
FIT_ENDED = "cohort.fit_ended"


def fit_in_background(trainer, wake=None) -> tuple[threading.Thread, dict[str, Any]]:
    """``trainer.fit()`` in a thread of its own: the thread, and the outcome it fills in ("result" or
    "error"). ``wake``: the queue the caller reads the fit's messages from, with a timeout; FIT_ENDED
    goes into it when the fit ends, so that the reader does not wait out its timeout (half a second)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = error
        finally:
            if wake is not None:
                try:
                    wake.put_nowait(FIT_ENDED)
                except Exception:  # noqa: BLE001 - full: the reader has a message anyway; gone: nobody to wake
                    pass

    thread = threading.Thread(target=fit, name="cohort-fit", daemon=True)
    thread.start()
    return thread, outcome


def fit_messages(thread: threading.Thread, messages, stopped: Callable[[], bool] = lambda: False) -> Iterator[Any]:
    """The messages of the fit running in ``thread`` (``fit_in_background(..., wake=messages)``), as
    they come, until the fit has ended and ``messages`` is empty, or ``stopped()``."""
    import queue

    while (thread.is_alive() or not messages.empty()) and not stopped():
        try:
            message = messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if message != FIT_ENDED:
            yield message


def abort_fit(thread: threading.Thread, controller, messages, timeout: float = 60.0) -> bool:
    """Stop a fit running in ``thread`` (``fit_in_background``): abort its Ray Train controller,
    which stops the workers and frees their CPUs, and wait for the thread. ``controller``: its actor
    handle if the driver has it already, else it is awaited in ``messages`` (the progress queue the
    controller announces itself in, ``cohort.driver.trainer.controller_announcer_class``) while the
    fit lives. True when the fit has ended within ``timeout`` seconds."""
    import queue

    import ray

    from cohort.driver.trainer import CONTROLLER, is_controller_message

    deadline = time.monotonic() + timeout
    while controller is None and thread.is_alive() and time.monotonic() < deadline:
        try:
            message = messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if is_controller_message(message):
            controller = message[CONTROLLER]
    if controller is not None and thread.is_alive():
        try:
            ray.get(controller.abort.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - the controller exits as it aborts (RayActorError), or had ended
            pass
    thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return not thread.is_alive()


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

