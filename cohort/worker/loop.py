"""The per-peer loop, run by every Ray Train worker: worker k trains peer k of the topology
(with replicas, a worker trains one replica of a peer on one shard of each batch: cohort.worker.grid).

``train_cohort`` reads top to bottom: set up → restore → epochs → report.
Each step: batch → own logits → exchange → own loss → backward → step.
Each epoch: evaluate on the whole test split → gather metrics to rank 0 → report (and checkpoint);
with snapshots (codistillation) on the worker's reporter thread, while the training goes on
(``train_without_barrier``, cohort.worker.handoff).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed
import torch.nn as nn

from cohort.config.errors import CohortError
from cohort.datasets import Batch, CohortDataset, load_dataset
from cohort.datasets.producer import ProducerClient, data_pipeline, node_producer
from cohort.gates.decision import Gating, StepDecision
from cohort.losses.batch import WHOLE_BATCH, WholeBatch
from cohort.losses.combine import NO_REPRESENTATIONS, Representations, peer_objective
from cohort.metrics import reliability
from cohort.metrics import scores as metrics
from cohort.metrics.temperature import log_probs_of, scaled_metrics, validation_metrics
from cohort.topology import Topology, topology_from_dict
from cohort.tuning.search_space import MetricExpression
from cohort.worker.checkpoint import (
    load_peer_state,
    restore_rng,
    rng_state,
    save_peer_state,
)
from cohort.worker.exchange import (
    LogitExchange,
    ReplicaBatch,
    gather_in_group,
    gather_rows,
    grid_groups,
)
from cohort.worker.grid import exchange_backend, shard_bounds, shard_loss_scale, slot_of
from cohort.worker.guard import BatchGuard
from cohort.worker.handoff import Handoff, Reporter, copied_state, copied_weights, epochs_ahead
from cohort.worker.payload import pad_rows, reads_embedding
from cohort.worker.peer import (
    apply_optimizer_settings,
    build_optimizer,
    build_peer,
    cohort_groups,
)
from cohort.worker.precision import autocast, grad_scaler
from cohort.worker.report import (
    ENSEMBLE,
    OBJECTIVE,
    EpochStats,
    cohort_key,
    cohort_report,
    metric_groups,
    peer_epoch_metrics,
)
from cohort.worker.representations import BatchShards, PeerTaps, peer_taps
from cohort.worker.snapshots import FROZEN, TeacherCopies, due, publish
from cohort.worker.syncbn import sync_batch_norm
from cohort.worker.ticker import StepTicker, epoch_steps, queue_sender

# --------------------------------------------------------------------------- one peer's training


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(kw_only=True)
class PeerStep:
    """What one worker's training step needs besides the batch: its peer, network and optimizer,
    the exchange, and where it sits in the grid (``shard`` of ``topology.replicas``)."""

    topology: Topology
    peer: str
    model: nn.Module
    optimizer: Any
    exchange: LogitExchange
    guard: BatchGuard
    groups: torch.Tensor | None = None
    device: torch.device = torch.device("cpu")
    shard: int = 0
    scaler: torch.amp.GradScaler | None = None
    batch: WholeBatch = WHOLE_BATCH  # batch statistics of losses: over the peer's replicas when it has them
    gating: Gating | None = None  # the topology's gates (every worker decides every step alike), if any
    ticker: StepTicker | None = None  # rank 0's step counter for the driver's display (cohort.run only)
    taps: PeerTaps | None = None  # the peer's representations and what it sends, when more than logits travel
    snapshots: Snapshots | None = None  # codistillation (exchange.mode: snapshot): the board and the teachers' copies
    producer: ProducerClient | None = None  # the node's batch producer (data.pipeline: producer), if any


@dataclass(kw_only=True)
class Snapshots:
    """A peer's side of the snapshot exchange (cohort.worker.snapshots): where it publishes, its
    copies of its teachers, its optimizer steps so far (its snapshots' version), and its part of
    every epoch (``(index, count)`` with ``exchange.data: disjoint``)."""

    board: Any
    copies: TeacherCopies
    every: int
    burn_in: int
    steps_done: int = 0
    part: tuple[int, int] | None = None
    state_bytes: int = 0  # the peer's weights: what one publication puts in the object store

    def published(self, model: nn.Module, peer: str) -> None:
        """Publish the weights after this step when due."""
        if due(self.steps_done, self.every):
            publish(self.board, peer, self.steps_done, model)


def train_epoch(run: PeerStep, data: CohortDataset, epoch: int) -> EpochStats:
    """One epoch of one peer (of its replica ``run.shard``: the shard-th part of every batch)."""
    topology, frozen, shards = run.topology, run.topology.peers[run.peer].frozen, run.topology.replicas
    run.model.train(not frozen)
    stats = EpochStats.for_peer(topology, run.peer)
    if run.ticker is not None:
        run.ticker.begin(epoch)
    snapshots = run.snapshots
    if snapshots is not None:
        stats.teachers = snapshots.copies.begin_epoch()
    step_started = (time.perf_counter(), time.process_time())
    part = snapshots.part if snapshots else None
    if run.producer is None:
        batches = data.train_batches(topology.data.batch_size, topology.seed, epoch, topology.data.num_workers, shards,
                                     sampler=topology.data.sampler, part=part)
    else:  # the same batches, made once on this node (cohort.datasets.producer)
        batches = run.producer.train_batches(data, topology.data.batch_size, topology.seed, epoch, shards,
                                             sampler=topology.data.sampler, part=part)
    for step, (inputs, labels) in enumerate(waited_for(batches, stats)):
        batch_size = len(labels)
        start, stop = shard_bounds(batch_size, shards, run.shard)
        # The whole batch's fingerprint (the same as without replicas, and on every shard) and the shard's;
        # with snapshots the peers do not meet within an epoch: compared at its end.
        if run.guard.see(inputs, labels, start, stop) and snapshots is None:
            run.guard.check(epoch)
        whole_batch = batch_shards(run, labels)
        inputs, labels = inputs[start:stop].to(run.device, non_blocking=True), labels[start:stop].to(run.device,
                                                                                                     non_blocking=True)
        with torch.set_grad_enabled(not frozen), autocast(topology.train.precision, run.device):
            own_logits = run.model(inputs)
            embedding, stages = run.taps.own() if run.taps is not None else (None, [])
        own_logits = own_logits.float()
        exchange_started = time.perf_counter()
        if snapshots is None:
            peer_logits, representations, sent = exchange_step(run, own_logits, embedding, stages, whole_batch)
            stats.exchange_bytes.append(sent.numel() * sent.element_size())
        else:
            peer_logits = {run.peer: own_logits, **snapshots.copies.logits(inputs, snapshots.steps_done)}
            representations = NO_REPRESENTATIONS
            # A publication's weights, spread over the steps between publications.
            stats.exchange_bytes.append(0 if frozen else snapshots.state_bytes // snapshots.every)
        stats.exchange_seconds.append(time.perf_counter() - exchange_started)
        decision = run.gating(peer_logits, labels) if run.gating is not None else None
        if frozen:
            stats.add(float(nn.functional.cross_entropy(own_logits, labels)), own_logits.detach(), labels)
        elif decision is not None and run.peer in decision.paused:
            hold(run, own_logits, embedding)
            stats.add(float(nn.functional.cross_entropy(own_logits.detach(), labels)), own_logits.detach(), labels)
        else:
            # Codistillation's burn-in: the first steps without distillation edges.
            burning_in = snapshots is not None and snapshots.steps_done < snapshots.burn_in
            loss = optimize(run, own_logits, labels, peer_logits, epoch, step, batch_size, decision, representations,
                            edges_off=burning_in)
            stats.add(loss, own_logits.detach(), labels)
        if decision is not None and not frozen:
            stats.count_gates(run.peer, decision, run.gating.gates)
        if snapshots is not None and not frozen:
            snapshots.steps_done += 1
            snapshots.published(run.model, run.peer)
        step_started = _step_ended(stats, step_started)
        if run.ticker is not None:
            run.ticker.tick(step + 1, batch_size)
    if stats.steps and snapshots is None:
        run.guard.check(epoch)  # every epoch ends with a check, whatever the interval (snapshots: in the report)
    return stats


def batch_shards(run: PeerStep, labels: torch.Tensor) -> BatchShards | None:
    """This replica's place in the whole batch (``labels``: the whole batch's) when the step gathers
    the whole batch's embeddings (replicas with MCL), else None."""
    if run.taps is None or not run.taps.whole_batch:
        return None
    return BatchShards(labels.to(run.device, non_blocking=True), run.topology.replicas, run.shard)


def waited_for(batches: Iterable[Batch], stats: EpochStats) -> Iterator[Batch]:
    """``batches``, each one's wait (the time in the iterator's ``next()``) added to ``stats.data_wait_seconds``."""
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            stats.data_wait_seconds += time.perf_counter() - started
        yield batch


def exchange_step(run: PeerStep, own_logits: torch.Tensor, embedding: torch.Tensor | None,
                  stages: list[torch.Tensor], shards: BatchShards | None = None,
                  ) -> tuple[dict[str, torch.Tensor], Representations, torch.Tensor]:
    """One collective: every peer's logits, this peer's representation inputs, and what it sent.

    ``shards``: the collective runs over every worker, so that this peer's loss sees every peer's
    embeddings of the whole batch (cohort.worker.representations.BatchShards)."""
    if run.taps is None:
        return run.exchange(own_logits), NO_REPRESENTATIONS, own_logits
    embedding = embedding.float() if embedding is not None else None
    stages = [stage.float() for stage in stages]
    sent = run.taps.layout.pack(run.peer, run.taps.outgoing(own_logits, embedding, stages))
    if shards is None:
        rows = run.exchange(sent)
    else:
        sent = pad_rows(sent, shards.largest)
        rows = shards.whole(gather_rows(sent, host_copies=run.exchange.host_copies), run.topology.peer_names)
    peer_logits, representations = run.taps.received(rows, embedding, stages, shards)
    return peer_logits, representations, sent


def hold(run: PeerStep, own_logits: torch.Tensor, embedding: torch.Tensor | None = None) -> None:
    """A paused step (cohort.gates): no optimizer step at all, so no weight decay and no momentum;
    the forward ran in training mode. A DDP forward waits for its backward: with replicas a zero
    backward completes it (through the embedding head too, when the loss reads it; the replicas all
    pause alike), and no step follows."""
    if isinstance(run.model, nn.parallel.DistributedDataParallel):
        zero = own_logits.sum() * 0.0
        if embedding is not None and embedding.requires_grad:
            zero = zero + embedding.sum() * 0.0
        zero.backward()


def optimize(run: PeerStep, own_logits: torch.Tensor, labels: torch.Tensor, peer_logits: dict[str, torch.Tensor],
             epoch: int, step: int, batch_size: int, decision: StepDecision | None = None,
             representations: Representations = NO_REPRESENTATIONS, edges_off: bool = False) -> float:
    """The peer's loss (without the edges the step's gates switched off, or without any edge with
    ``edges_off``), backward and optimizer step; the loss's value."""
    topology, peer, scaler, optimizer = run.topology, run.peer, run.scaler, run.optimizer
    edges = topology.incoming_edges(peer)
    off = range(len(edges)) if edges_off else decision.edges_off(peer, edges) if decision is not None else ()
    loss, terms = peer_objective(own_logits, labels, edges, peer_logits,
                                 topology.train.ce_weight, epoch, run.groups, run.batch, off, representations)
    if not torch.isfinite(loss):
        bad = next((name for name, value in terms.items() if not torch.isfinite(value)), "total")
        raise NonFiniteLoss(f"peer {peer!r}: non-finite loss at epoch {epoch}, step {step} (term: {bad})")
    optimizer.zero_grad(set_to_none=True)
    shards = topology.replicas
    # DDP averages the replicas' gradients: scaled so, the average is the whole batch's gradient.
    scaled = loss * shard_loss_scale(len(labels), batch_size, shards) if shards > 1 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    gradient_norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    # Under fp16 an overflowing gradient is expected now and then: the scaler skips that step.
    if not torch.isfinite(gradient_norm) and scaler is None:
        values = ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items())
        raise NonFiniteLoss(f"peer {peer!r}: non-finite gradient at epoch {epoch}, step {step} (terms: {values})")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


def _step_ended(stats: EpochStats, step_started: tuple[float, float]) -> tuple[float, float]:
    """Record the step that began at ``step_started`` (wall, CPU); return when the next one begins."""
    now = (time.perf_counter(), time.process_time())
    stats.step_seconds.append(now[0] - step_started[0])
    stats.step_cpu_seconds.append(now[1] - step_started[1])
    if stats.first_step_at is None:
        stats.first_step_at = time.time()
    return now


CPU = torch.device("cpu")


@torch.no_grad()
def evaluate(model, data: CohortDataset, exchange: LogitExchange, batch_size: int, num_workers: int = 0,
             device: torch.device = CPU, precision: str = "fp32", shard: int = 0, shards: int = 1,
             peer_group=None, batches=None):
    """This peer's test logits, the cohort ensemble's probabilities (mean over all peers), the labels
    and, per image, whether two peers predict different classes (the cohort's churn), on the CPU
    (``batches``: other batches than the test split's, e.g. the validation split's).

    With replicas, each evaluates its shard of every test batch and the peer's replicas share
    their parts, so every replica ends with the whole test split, in the order of one worker.
    """
    model.eval()
    own, ensemble, labels, disagree = [], [], [], []
    for inputs, batch_labels in (data.test_batches(batch_size, num_workers) if batches is None else batches):
        start, stop = shard_bounds(len(batch_labels), shards, shard)
        if start == stop:  # a test batch smaller than the shard count: the whole shard group skips it
            own.append(torch.empty(0))
            ensemble.append(torch.empty(0))
            labels.append(batch_labels[:0])
            disagree.append(torch.empty(0, dtype=torch.bool))
            continue
        with autocast(precision, device):
            logits = model(inputs[start:stop].to(device, non_blocking=True))
        logits = logits.float()
        peer_logits = exchange(logits)
        own.append(logits.cpu())
        ensemble.append(torch.stack([l.softmax(dim=1) for l in peer_logits.values()]).mean(dim=0).cpu())
        labels.append(batch_labels[start:stop])
        predicted = torch.stack([l.argmax(dim=1) for l in peer_logits.values()])
        disagree.append((predicted != predicted[0]).any(dim=0).cpu())
    replicas = gather_in_group((own, ensemble, labels, disagree), peer_group)
    # Batch by batch, shard by shard: the order of the test split.
    return tuple(torch.cat([part[kind][batch] for batch in range(len(own)) for part in replicas
                            if part[kind][batch].numel()])
                 for kind in range(4))

# --------------------------------------------------------------------------- the Ray Train entry point


def train_cohort(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the cohort's ``TorchTrainer``.

    ``config`` holds the resolved topology (as plain data), the torch thread count, the queue
    through which rank 0 sends each epoch's cohort metrics to the driver (``cohort.run``), and
    the metric expression rank 0 reports as ``objective`` (``cohort.tuning.sweep``).
    """
    # Wall-clock times (comparable with the driver's) of the worker's start-up, sent with its first epoch.
    startup = {"worker_start": time.time()}
    import ray.train

    worker = setup_worker(config, startup)
    # A restart (after a worker died) or a resumed run continues after the run's last checkpoint;
    # a Tune trial may start from one Tune hands it (PBT's exploit, a resumed sweep).
    checkpoint = ray.train.get_checkpoint() or config.get("initial_checkpoint")
    if checkpoint is not None:
        restore(worker, checkpoint)
    if worker.snapshots is not None:
        start_snapshots(worker)
    run = peer_step(worker, live_steps=bool(config.get("live_steps")))
    if worker.snapshots is not None:
        train_without_barrier(worker, run)
        return
    for epoch in range(worker.first_epoch, worker.topology.train.epochs + 1):
        report, evaluation = run_epoch(worker, run, epoch)
        end_epoch(worker, epoch, report, evaluation)


def train_without_barrier(worker: WorkerState, run: PeerStep) -> None:
    """Codistillation's epochs (cohort.worker.handoff): this thread trains epoch after epoch and
    hands each one over; the reporter thread evaluates, meets the other peers and reports to Ray
    Train, in epoch order. Ends when every epoch is reported; a report's error is raised here."""
    evaluator = copy.deepcopy(worker.net)  # the reports' network: each epoch's copied weights loaded into it
    reporter = Reporter(lambda handoff, latest: report_handoff(worker, evaluator, handoff, latest))
    for epoch in range(worker.first_epoch, worker.topology.train.epochs + 1):
        reporter.submit(epoch, hand_over(worker, run, epoch))
    reporter.close()


def hand_over(worker: WorkerState, run: PeerStep, epoch: int) -> Handoff:
    """Train one epoch; copies of what its report and checkpoint read."""
    stats, train_seconds = train_and_schedule(worker, run, epoch)
    ended_at = time.time()
    state = None
    if worker.shard == 0 and checkpoint_due(worker.topology, epoch):
        state = copied_state(training_state(worker, epoch))
    return Handoff(epoch=epoch, stats=stats, train_seconds=train_seconds, train_ended_at=ended_at,
                   weights=state["model"] if state is not None else copied_weights(worker.net),
                   guard=(worker.guard.record(), worker.guard.step), state=state)


def report_handoff(worker: WorkerState, evaluator: nn.Module, handoff: Handoff, latest: int) -> None:
    """On the reporter thread: the batch check (shared data), the evaluation of the epoch's weights,
    the epoch's report and its checkpoint. ``latest``: the newest epoch the training thread handed over."""
    epoch, stats = handoff.epoch, handoff.stats
    if stats.steps and worker.snapshots.part is None:
        worker.guard.check_record(*handoff.guard, epoch)
    evaluator.load_state_dict(handoff.weights)
    started, cpu_started = time.perf_counter(), time.thread_time()
    # Test batches made on this thread: a DataLoader with workers would draw its seed from the
    # process's RNG, which the training thread is drawing from meanwhile (dropout, augmentation).
    evaluation, validation = evaluate_peer(worker, evaluator, num_workers=0)
    pace = {"train_ended_at": handoff.train_ended_at, "epochs_ahead": float(epochs_ahead(latest, epoch)),
            "eval_seconds": time.perf_counter() - started, "eval_cpu_seconds": time.thread_time() - cpu_started}
    fingerprint = handoff.guard[0]["batch"]  # the guard's fingerprint of every batch up to the epoch's end
    report = epoch_report(worker, epoch, stats, handoff.train_seconds, fingerprint, evaluation, validation, pace)
    end_epoch(worker, epoch, report, evaluation, handoff.state, evaluator)


@dataclass(kw_only=True)
class WorkerState:
    """What one worker holds from its set-up to its last epoch."""

    topology: Topology
    rank: int
    peer: str
    shard: int
    device: torch.device
    data: CohortDataset
    net: nn.Module  # the peer's own network (never wrapped in DDP)
    optimizer: Any
    scheduler: Any
    scaler: Any
    exchange: LogitExchange
    guard: BatchGuard
    peer_group: Any  # the peer's replicas' process group, or None
    groups: torch.Tensor | None  # class groups on the device, for ltkd edges
    metric_groups: tuple[Any, Any]  # (groups, names) of the per-group metrics, or (None, None)
    host_copies: bool
    workers: list[dict[str, Any]]  # every worker's placement (rank 0 reports them)
    progress: Any = None  # the driver's queue (cohort.run), or None
    objective: MetricExpression | None = None
    startup: dict[str, float] | None = None  # sent once, with the first epoch this worker runs
    history: list[dict[str, Any]] = field(default_factory=list)  # rank 0's reports so far, kept in its checkpoints
    first_epoch: int = 1
    gating: Gating | None = None  # the topology's gates, if any (their state is in the checkpoints)
    taps: PeerTaps | None = None  # the peer's representations, when the cohort exchanges more than logits
    snapshots: Snapshots | None = None  # codistillation (exchange.mode: snapshot)
    producer: ProducerClient | None = None  # the node's batch producer (data.pipeline: producer), if any

    @property
    def frozen(self) -> bool:
        return self.topology.peers[self.peer].frozen

    @property
    def replicas_train(self) -> bool:
        return self.peer_group is not None and not self.frozen


def setup_worker(config: dict[str, Any], startup: dict[str, float]) -> WorkerState:
    """This worker's peer built, with its optimizer, exchange and batch guard, and its data loaded."""
    import ray
    import ray.train
    import ray.train.torch

    topology = topology_from_dict(config["topology"])
    rank = ray.train.get_context().get_world_rank()
    slot = slot_of(rank, topology.peer_names)
    peer, shards = slot.peer, topology.replicas
    threads = config["threads"]
    torch.set_num_threads(threads[peer] if isinstance(threads, dict) else threads)
    # The driver's copy through the object store when it sent one (cohort.run), else loaded here.
    data = (ray.get(config["dataset"]) if config.get("dataset") is not None
            else load_dataset(topology.data, topology.seed))
    startup["data_loaded"] = time.time()
    grouping = cohort_groups(topology, data.info)
    device = ray.train.torch.get_device() if topology.resources.use_gpu else torch.device("cpu")
    placement = worker_placement(rank, slot, device)
    # A checkpoint's weights as the driver read them, through the object store: the workers never
    # open the checkpoint's path (on a cluster, a file only the driver has).
    sent = (config.get("weights") or {}).get(peer)
    net = build_peer(topology, peer, data.info, ray.get(sent) if sent is not None else None).to(device)
    frozen = topology.peers[peer].frozen
    backend = exchange_backend(topology.resources.use_gpu, topology.resources.gpus_per_worker)
    exchange_group, peer_group = grid_groups(topology.peer_names, shards, rank)
    if peer_group is not None and not frozen and topology.peers[peer].sync_batchnorm:
        # Before the optimizer: the synchronized layers are new modules (with the same parameters' values).
        sync_batch_norm(net, peer_group, device.type, backend.host_copies)
    if frozen:
        for parameter in net.parameters():
            parameter.requires_grad_(False)
    optimizer, scheduler = (None, None) if frozen else build_optimizer(net, topology.optimizer_for(peer), topology)
    scaler = None if frozen else grad_scaler(topology.train.precision, device)
    exchange = LogitExchange(topology.peer_names, exchange_group, host_copies=backend.host_copies)
    workers = gather_in_group(placement, torch.distributed.group.WORLD)  # rank 0 reports them
    guard = BatchGuard(peer, slot.shard, shards, topology.train.check_batches_every,
                       lambda record: gather_in_group(record, torch.distributed.group.WORLD))
    # Every worker decides every gate, from batch means over the whole batch (its shard's peer group
    # reduces over the shards: every peer's group gets the same sums).
    gating = Gating(topology.gates, ReplicaBatch(peer_group, backend.host_copies) if peer_group is not None
                    else WHOLE_BATCH) if topology.gates else None
    taps = peer_taps(topology, peer, net, data.info.input_size, data.info.num_classes, exchange.gather_objects)
    snapshots = snapshot_side(topology, peer, net, data.info, device, config) if topology.exchange.snapshot else None
    producer = batch_producer(config, topology, data, rank, ray.train.get_context().get_local_world_size())
    startup["model_built"] = time.time()
    return WorkerState(
        topology=topology, rank=rank, peer=peer, shard=slot.shard, device=device, data=data, net=net,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, exchange=exchange, guard=guard, peer_group=peer_group,
        groups=grouping[0].to(device) if grouping else None, metric_groups=metric_groups(topology, grouping),
        host_copies=backend.host_copies, workers=workers, progress=config.get("progress"),
        objective=MetricExpression(config["objective"]) if config.get("objective") else None, startup=startup,
        gating=gating, taps=taps, snapshots=snapshots, producer=producer)


def batch_producer(config: dict[str, Any], topology: Topology, data: CohortDataset, rank: int,
                   workers: int) -> ProducerClient | None:
    """This worker's (``rank``'s) side of its node's batch producer when the run's pipeline is
    ``producer`` or ``stream`` (the driver's choice, else ``data.pipeline``'s for this data: the same on every
    worker); ``workers``: the run's workers on this node. The producer gets the driver's copy of the
    data when there is one, else this worker's."""
    pipeline = config.get("pipeline")
    if pipeline is None or (pipeline["choice"] or data_pipeline(topology, data.info)) not in ("producer", "stream"):
        return None
    dataset = config.get("dataset") if config.get("dataset") is not None else data
    return ProducerClient(lambda: node_producer(pipeline["key"], dataset, topology, workers), worker=str(rank))


def snapshot_side(topology: Topology, peer: str, net: nn.Module, info, device: torch.device,
                  config: dict[str, Any]) -> Snapshots:
    """The peer's side of the snapshot exchange: a copy of each teacher's network (its weights come
    from the board before the first step), where it publishes, its part of the data."""
    import ray

    exchange = topology.exchange
    sent = config.get("weights") or {}
    copies = {}
    with torch.random.fork_rng(devices=[]):  # building a network seeds the RNG: this worker's own is kept
        for teacher in topology.teachers_of(peer):
            weights = ray.get(sent[teacher]) if teacher in sent else None
            copies[teacher] = build_peer(topology, teacher, info, weights).to(device)
            copies[teacher].requires_grad_(False)
    index = topology.peer_names.index(peer)
    part = (index, len(topology.peer_names)) if exchange.data == "disjoint" else None
    state_bytes = sum(value.numel() * value.element_size() for value in net.state_dict().values())
    return Snapshots(board=config["snapshot_board"], every=exchange.every, burn_in=exchange.burn_in, part=part,
                     copies=TeacherCopies(board=config["snapshot_board"], copies=copies, every=exchange.every,
                                          staleness=exchange.staleness, train_mode=exchange.teachers == "train"),
                     state_bytes=state_bytes)


def restore(worker: WorkerState, checkpoint) -> None:
    """Continue from ``checkpoint``: the peer's weights, optimizer, schedule, scaler, RNG, batch guard
    and rank 0's reports so far (sent to the driver again)."""
    # Every replica of a peer reads the peer's one state.
    with checkpoint.as_directory() as folder:
        state = load_peer_state(folder, worker.peer)
    worker.net.load_state_dict(state["model"])
    if worker.optimizer is not None:
        worker.optimizer.load_state_dict(state["optimizer"])
        worker.scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(worker.optimizer, worker.scheduler, worker.topology.optimizer_for(worker.peer))
    if worker.scaler is not None and state.get("scaler"):
        worker.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], worker.device)
    worker.first_epoch = int(state["epoch"]) + 1
    restore_guard(worker.guard, state, worker.topology.replicas)
    if worker.gating is not None and state.get("gates") is not None:
        worker.gating.load_state_dict(state["gates"])
    worker.history = list(state.get("history", []))
    if worker.progress is not None:
        # The driver may have stopped before logging the epochs this checkpoint covers: send
        # them again; it logs each epoch once.
        for report in worker.history:
            worker.progress.put(report)


def start_snapshots(worker: WorkerState) -> None:
    """Before the first step (of a run, a restart or a resume): the peer's steps so far, and its
    current weights published as that version, in place of whatever an earlier worker group published
    (its objects died with it)."""
    snapshots, topology = worker.snapshots, worker.topology
    per_epoch = epoch_steps(worker.data.info.train_size, topology.data.batch_size,
                            whole_batches=topology.data.sampler is not None)
    if snapshots.part is not None:
        per_epoch //= snapshots.part[1]
    snapshots.steps_done = 0 if worker.frozen else (worker.first_epoch - 1) * per_epoch
    publish(snapshots.board, worker.peer, FROZEN if worker.frozen else snapshots.steps_done, worker.net, replace=True)
    # Once every peer has replaced its entries, no reader can take a snapshot whose owner died.
    torch.distributed.barrier()


def peer_step(worker: WorkerState, live_steps: bool = False) -> PeerStep:
    """The training step's parts; the network in DDP over the peer's replicas where they train; on
    rank 0 with ``live_steps``, the step counter it sends the driver."""
    model, device = worker.net, worker.device
    if worker.replicas_train:
        # Data parallelism within the peer's own replicas only: peers are different networks.
        # An embedding head the peer's loss does not read (it only sends) gets no gradient: DDP is told.
        model = nn.parallel.DistributedDataParallel(worker.net, process_group=worker.peer_group,
                                                    device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=unused_head(worker))
    ticker = None
    if live_steps and worker.rank == 0 and worker.progress is not None:
        topology = worker.topology
        ticker = StepTicker(queue_sender(worker.progress),
                            epoch_steps(worker.data.info.train_size, topology.data.batch_size, topology.replicas,
                                        whole_batches=topology.data.sampler is not None))
    return PeerStep(topology=worker.topology, peer=worker.peer, model=model, optimizer=worker.optimizer,
                    exchange=worker.exchange, guard=worker.guard, groups=worker.groups, device=device,
                    shard=worker.shard, scaler=worker.scaler,
                    batch=ReplicaBatch(worker.peer_group, worker.host_copies) if worker.replicas_train else WHOLE_BATCH,
                    gating=worker.gating, ticker=ticker, taps=worker.taps, snapshots=worker.snapshots,
                    producer=worker.producer)


def unused_head(worker: WorkerState) -> bool:
    """Whether the peer has an embedding head that its own loss does not read (it only sends)."""
    return (worker.topology.peers[worker.peer].embedding is not None
            and not reads_embedding(worker.topology, worker.peer))


def run_epoch(worker: WorkerState, run: PeerStep, epoch: int) -> tuple[dict[str, Any], tuple]:
    """Train and evaluate one epoch; rank 0's report of the cohort (empty on the other ranks), and
    this worker's evaluation: (own test logits, the ensemble's probabilities, the test labels, the peers' disagreement)."""
    stats, train_seconds = train_and_schedule(worker, run, epoch)
    stats = EpochStats.merged(gather_in_group(stats, worker.peer_group))
    evaluation, validation = evaluate_peer(worker, worker.net)
    report = epoch_report(worker, epoch, stats, train_seconds, worker.guard.fingerprint, evaluation, validation)
    return report, evaluation


def train_and_schedule(worker: WorkerState, run: PeerStep, epoch: int) -> tuple[EpochStats, float]:
    """One epoch's training and the schedule's step; the epoch's stats and its seconds."""
    started = time.perf_counter()
    try:
        stats = train_epoch(run, worker.data, epoch)
    except NonFiniteLoss as error:
        raise CohortError(str(error)) from None
    if worker.scheduler is not None:
        worker.scheduler.step()
    return stats, time.perf_counter() - started


def evaluate_peer(worker: WorkerState, net: nn.Module, num_workers: int | None = None) -> tuple[tuple, tuple | None]:
    """``net``'s evaluation (``evaluate``) on the test split (its batches made by ``num_workers``
    processes, by default ``data.num_workers``), and on the validation split when there is one."""
    topology = worker.topology
    num_workers = topology.data.num_workers if num_workers is None else num_workers
    evaluation = evaluate(net, worker.data, worker.exchange, topology.data.eval_batch_size,
                          num_workers, worker.device, topology.train.precision, worker.shard,
                          topology.replicas, worker.peer_group)
    validation = None
    if worker.data.info.val_size:
        # The validation split: its accuracy and NLL, and when due the temperature fitted on it (cohort.metrics.temperature).
        validation = evaluate(net, worker.data, worker.exchange, topology.data.eval_batch_size,
                              device=worker.device, precision=topology.train.precision, shard=worker.shard,
                              shards=topology.replicas, peer_group=worker.peer_group,
                              batches=worker.data.val_batches(topology.data.eval_batch_size))
    return evaluation, validation


def epoch_report(worker: WorkerState, epoch: int, stats: EpochStats, train_seconds: float, fingerprint: int,
                 evaluation: tuple, validation: tuple | None, extra: dict[str, float] | None = None) -> dict[str, Any]:
    """Gather every peer's metrics of the epoch (``extra``: this peer's further ones); rank 0's
    report of the cohort (empty on the other ranks), also sent to the driver."""
    topology = worker.topology
    own_logits, ensemble_probs, test_labels, disagree = evaluation
    contribution = peer_epoch_metrics(stats, own_logits, test_labels, train_seconds, fingerprint,
                                      *worker.metric_groups)
    if validation is not None:
        contribution.update(calibration_metrics(validation[0], validation[2], own_logits, test_labels,
                                                calibrating(topology, epoch), worker.metric_groups))
    contribution.update(extra or {})
    if worker.startup is not None:
        contribution["startup"] = {**worker.startup, "first_step": stats.first_step_at}
        worker.startup = None  # sent once, with the first epoch this worker runs
    everyone = worker.exchange.gather_objects(contribution)
    report: dict[str, Any] = {}
    if worker.rank == 0:
        ensemble = metrics.evaluate_probs(ensemble_probs, test_labels, *worker.metric_groups)
        if validation is not None:
            ensemble.update(calibration_metrics(log_probs_of(validation[1]), validation[2], log_probs_of(ensemble_probs),
                                                test_labels, calibrating(topology, epoch), worker.metric_groups))
        report = cohort_report(topology, epoch, everyone, ensemble)
        if len(topology.peers) > 1:  # the share of test images on which two peers predict different classes
            report[cohort_key("churn")] = float(disagree.float().mean())
        report[cohort_key("workers")] = worker.workers
        if worker.objective is not None:
            try:
                report[OBJECTIVE] = worker.objective(report)
            except KeyError as error:
                raise CohortError(f"metric: {error.args[0]}") from None
        worker.history.append(report)
        if worker.progress is not None:
            worker.progress.put(report)
    return report


def calibrating(topology: Topology, epoch: int) -> bool:
    """Whether this epoch fits the temperatures: the last one, and every ``train.calibrate_every``."""
    every = topology.train.calibrate_every
    return epoch == topology.train.epochs or bool(every and epoch % every == 0)


def calibration_metrics(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
                        test_labels: torch.Tensor, fit: bool, groups: tuple[Any, Any]) -> dict[str, float]:
    """``val_acc``, ``val_nll`` and, when ``fit``, the temperature and the test metrics after scaling."""
    out = validation_metrics(val_logits, val_labels)
    if fit:
        out.update(scaled_metrics(val_logits, val_labels, test_logits, test_labels, *groups))
    return out


def checkpoint_due(topology: Topology, epoch: int) -> bool:
    """Whether ``epoch`` ends with a checkpoint: the last one, and every ``train.checkpoint_every``."""
    return epoch == topology.train.epochs or epoch % topology.train.checkpoint_every == 0


def end_epoch(worker: WorkerState, epoch: int, report: dict[str, Any], evaluation: tuple,
              state: dict[str, Any] | None = None, net: nn.Module | None = None) -> None:
    """Report the epoch to Ray Train, with the peer's checkpoint when one is due: ``state`` and
    ``net``, the training state and network as the epoch ended (the worker's own by default; with
    snapshots, copies: the training has gone on)."""
    import ray.train

    last = epoch == worker.topology.train.epochs
    # One state per peer, written by its first replica (the replicas' weights are equal).
    if worker.shard == 0 and checkpoint_due(worker.topology, epoch):
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(worker, folder, epoch, state)
            if last:
                own_logits, ensemble_probs, test_labels, _ = evaluation
                save_final(folder, worker.peer, net if net is not None else worker.net, own_logits, test_labels,
                           ensemble_probs if worker.rank == 0 else None)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(report)


def save_checkpoint(worker: WorkerState, folder: str, epoch: int, state: dict[str, Any] | None = None) -> None:
    """The peer's training state after ``epoch`` (``state``, else the worker's now), with rank 0's
    reports so far, in ``folder`` (cohort.worker.checkpoint)."""
    state = training_state(worker, epoch) if state is None else state
    save_peer_state(folder, worker.peer, {**state, "history": worker.history})


def training_state(worker: WorkerState, epoch: int) -> dict[str, Any]:
    """The peer's training state after ``epoch``, as its checkpoint holds it (without the reports)."""
    guard, optimizer, scheduler, scaler = worker.guard, worker.optimizer, worker.scheduler, worker.scaler
    return {
        "epoch": epoch, "fingerprint": guard.fingerprint, "step": guard.step,
        "shard_fingerprint": guard.shard_fingerprint, "rng": rng_state(worker.device),
        "model": worker.net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "gates": worker.gating.state_dict() if worker.gating is not None else None,
    }


def restore_guard(guard: BatchGuard, state: dict[str, Any], replicas: int) -> None:
    """The guard's count and fingerprints from a checkpoint. Every replica reads the state replica 0
    wrote: the whole batches' fingerprint and the step count are everyone's; the shard fingerprint
    is replica 0's, so the others start theirs afresh (all replicas alike, the shard groups agree)."""
    guard.fingerprint, guard.step = int(state["fingerprint"]), int(state.get("step", 0))
    guard.shard_fingerprint = int(state.get("shard_fingerprint", 0)) if replicas == 1 else 0


def worker_placement(rank: int, slot, device: torch.device) -> dict[str, Any]:
    """Where this worker runs: its place in the grid, its Ray node and its device."""
    import ray

    return {"rank": rank, "peer": slot.peer, "replica": slot.shard, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "device": str(device)}


def save_final(folder: str, peer: str, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
               ensemble_probs: torch.Tensor | None) -> None:
    """The peer's weights and reliability bins (JSON: the driver draws the diagram when it logs them,
    cohort.tracking.tracker.log_checkpoint_artifacts, so no worker imports matplotlib); rank 0 adds
    the ensemble's."""
    torch.save({key: value.cpu() for key, value in model.state_dict().items()}, os.path.join(folder, f"{peer}.pt"))
    diagrams = [(peer, reliability.reliability_bins(logits, labels))]
    if ensemble_probs is not None:
        diagrams.append((ENSEMBLE, reliability.reliability_bins_probs(ensemble_probs, labels)))
    for name, bins in diagrams:
        with open(os.path.join(folder, reliability.bins_file_name(name)), "w") as file:
            json.dump(bins.as_dict(), file)
