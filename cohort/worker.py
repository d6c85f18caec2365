"""The per-peer loop, run by every Ray Train worker: worker k trains peer k of the topology
(with replicas, a worker trains one replica of a peer on one shard of each batch: cohort.grid).

Each step, read top to bottom: batch → own logits → exchange → own loss → backward → step.
Each epoch: evaluate on the whole test split → gather metrics to rank 0 → report.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed
import torch.nn as nn

from cohort import metrics, reliability
from cohort.checkpoint import load_peer_state, load_tensors, restore_rng, rng_state, save_peer_state
from cohort.datasets import CohortDataset, DatasetInfo, load_dataset
from cohort.errors import CohortError
from cohort.exchange import LogitExchange, ReplicaBatch, gather_in_group, grid_groups
from cohort.guard import BatchGuard
from cohort.grid import exchange_backend, shard_bounds, shard_loss_scale, slot_of
from cohort.losses import LOSSES
from cohort.losses.batch import WHOLE_BATCH, WholeBatch
from cohort.losses.combine import peer_objective
from cohort.models import build_model
from cohort.precision import autocast, grad_scaler
from cohort.syncbn import sync_batch_norm
from cohort.search_space import MetricExpression
from cohort.topology import OptimizerConfig, Topology, topology_from_dict


# --------------------------------------------------------------------------- building a peer


def peer_seed(topology: Topology, peer: str) -> int:
    """The seed of a peer's initial weights: differs across peers, fixed by the topology's seed."""
    return topology.seed * 10_007 + topology.peer_names.index(peer)


def build_peer(topology: Topology, peer: str, info: DatasetInfo,
               weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The peer's network, initialized from its seed, or given its checkpoint's weights if it has
    one: ``weights``, the state_dict the driver read from the checkpoint (and sent through Ray's
    object store), else read here from the checkpoint's path. Either way checked against the model."""
    torch.manual_seed(peer_seed(topology, peer))
    config = topology.peers[peer]
    try:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            **config.model_args)
    except (TypeError, ValueError) as error:
        raise CohortError(f"cannot build {config.model!r}: {error}", f"peers.{peer}.model") from None
    if config.checkpoint:
        where = f"peers.{peer}.checkpoint"
        state = read_weights(config.checkpoint, where) if weights is None else weights
        model.load_state_dict(check_weights(state, model, config.checkpoint, where))
    return model


def read_weights(path: str, where: str, name: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in the file ``path`` (tensors only: ``weights_only=True``); ``name``: what to
    call it in messages (the checkpoint as the topology gives it), default the path."""
    name = name or path
    if not os.path.isfile(path):
        raise CohortError(f"checkpoint {name!r} does not exist", where)
    try:
        state = load_tensors(path)
    except CohortError as error:
        raise CohortError(f"cannot load checkpoint {name!r}: {error.message}", where) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CohortError(f"checkpoint {name!r} is not a state_dict of tensors", where)
    return state


def check_weights(state: dict[str, torch.Tensor], model: nn.Module, name: str, where: str) -> dict[str, torch.Tensor]:
    """``state`` (from checkpoint ``name``) if it fits ``model``: the same keys and shapes."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CohortError(f"checkpoint {name!r} is not a state_dict of tensors", where)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CohortError(f"checkpoint {name!r} does not fit the model ({detail})", where)
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CohortError(
                f"checkpoint {name!r} does not fit the model: {key} is {tuple(tensor.shape)}, "
                f"the model's is {tuple(expected[key].shape)} (a different model or number of classes?)",
                where,
            )
    return state


def load_weights(path: str, model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``path`` (tensors only: ``weights_only=True``), checked against ``model``."""
    return check_weights(read_weights(path, where), model, path, where)


def build_optimizer(model: nn.Module, config: OptimizerConfig, topology: Topology):
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.name == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0)
    elif config.name == "adam":
        optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = topology.train.schedule
    # Schedules step once per epoch, as in the KD literature's recipes.
    if schedule.name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=topology.train.epochs)
    elif schedule.name == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                         gamma=schedule.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


def apply_optimizer_settings(optimizer, scheduler, config: OptimizerConfig) -> None:
    """Give a restored optimizer the topology's settings, which PBT may have changed since the
    checkpoint: the schedule's progress is kept, rescaled to the new base learning rate."""
    for group in optimizer.param_groups:
        if group.get("initial_lr") != config.lr:
            ratio = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
            group["initial_lr"], group["lr"] = config.lr, config.lr * ratio
        group["weight_decay"] = config.weight_decay
        if "momentum" in group:
            group["momentum"] = config.momentum
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


SHOT_GROUPS = ("many", "medium", "few")


def cohort_groups(topology: Topology, info: DatasetInfo) -> tuple[torch.Tensor, list[str]] | None:
    """The class groups of ``data.groups`` (thirds by default for a long-tailed set) from the
    training counts, for ``ltkd`` edges and per-group metrics; None when neither needs them."""
    rule = topology.data.groups or ("thirds" if topology.data.long_tail else None)
    ltkd = [edge for edge in topology.edges if "groups" in LOSSES[edge.loss].context]
    if rule is None and not ltkd:
        return None
    try:
        groups, names = metrics.class_groups(torch.tensor(info.train_class_counts), rule or "thirds")
    except ValueError as error:
        raise CohortError(f"cannot form {rule or 'thirds'} groups: {error}", "data.groups") from None
    if ltkd and rule == "shots" and len(names) < len(SHOT_GROUPS):
        empty = [name for name in SHOT_GROUPS if name not in names]
        raise CohortError(f"shots leaves group(s) {', '.join(map(repr, empty))} empty on this training set "
                          f"(class counts {min(info.train_class_counts)}-{max(info.train_class_counts)}); "
                          f"the ltkd edge {ltkd[0].label} needs every group: use groups: thirds", "data.groups")
    return groups, names


# --------------------------------------------------------------------------- one peer's training


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    # Wall-clock seconds of each step (batch included) and of its exchange, which includes waiting
    # for the slower peers: where a cohort's time goes, for a few clock reads per step.
    step_seconds: list[float] = field(default_factory=list)
    exchange_seconds: list[float] = field(default_factory=list)
    # CPU seconds of this process per step: against step_seconds, whether a slow step worked or waited.
    step_cpu_seconds: list[float] = field(default_factory=list)
    first_step_at: float | None = None  # time.time() when the epoch's first step ended

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss * len(labels)
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.seen += len(labels)
        self.steps += 1

    def summary(self) -> dict[str, float]:
        return {"train_loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct / max(self.seen, 1),
                "step_seconds": _median(self.step_seconds), "exchange_seconds": _median(self.exchange_seconds),
                "step_cpu_seconds": _median(self.step_cpu_seconds)}

    @classmethod
    def merged(cls, replicas: list["EpochStats"]) -> "EpochStats":
        """A peer's epoch over all its replicas' shards (its timings: the first replica's)."""
        first = replicas[0]
        return cls(sum(r.loss_sum for r in replicas), sum(r.correct for r in replicas),
                   sum(r.seen for r in replicas), max(r.steps for r in replicas), first.step_seconds,
                   first.exchange_seconds, first.step_cpu_seconds, first.first_step_at)


def _median(values: list[float]) -> float:
    # The median leaves out the first steps' warm-up and the odd step slowed by other processes.
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
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


def train_epoch(run: PeerStep, data: CohortDataset, epoch: int) -> EpochStats:
    """One epoch of one peer (of its replica ``run.shard``: the shard-th part of every batch)."""
    topology, frozen, shards = run.topology, run.topology.peers[run.peer].frozen, run.topology.replicas
    run.model.train(not frozen)
    stats = EpochStats()
    step_started = (time.perf_counter(), time.process_time())
    for step, (inputs, labels) in enumerate(data.train_batches(topology.data.batch_size, topology.seed, epoch,
                                                                     topology.data.num_workers, shards)):
        batch_size = len(labels)
        start, stop = shard_bounds(batch_size, shards, run.shard)
        # The whole batch's fingerprint (the same as without replicas, and on every shard) and the shard's.
        if run.guard.see(inputs, labels, start, stop):
            run.guard.check(epoch)
        inputs, labels = inputs[start:stop].to(run.device, non_blocking=True), labels[start:stop].to(run.device,
                                                                                                     non_blocking=True)
        with torch.set_grad_enabled(not frozen), autocast(topology.train.precision, run.device):
            own_logits = run.model(inputs)
        own_logits = own_logits.float()
        exchange_started = time.perf_counter()
        peer_logits = run.exchange(own_logits)
        stats.exchange_seconds.append(time.perf_counter() - exchange_started)
        if frozen:
            stats.add(float(nn.functional.cross_entropy(own_logits, labels)), own_logits.detach(), labels)
        else:
            loss = optimize(run, own_logits, labels, peer_logits, epoch, step, batch_size)
            stats.add(loss, own_logits.detach(), labels)
        step_started = _step_ended(stats, step_started)
    if stats.steps:  # every epoch ends with a check, whatever the interval
        run.guard.check(epoch)
    return stats


def optimize(run: PeerStep, own_logits: torch.Tensor, labels: torch.Tensor, peer_logits: dict[str, torch.Tensor],
             epoch: int, step: int, batch_size: int) -> float:
    """The peer's loss, backward and optimizer step; the loss's value."""
    topology, peer, scaler, optimizer = run.topology, run.peer, run.scaler, run.optimizer
    loss, terms = peer_objective(own_logits, labels, topology.incoming_edges(peer), peer_logits,
                                 topology.train.ce_weight, epoch, run.groups, run.batch)
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


@torch.no_grad()
def evaluate(model, data: CohortDataset, exchange: LogitExchange, batch_size: int, num_workers: int = 0,
             device: torch.device = torch.device("cpu"), precision: str = "fp32", shard: int = 0, shards: int = 1,
             peer_group=None):
    """This peer's test logits, and the cohort ensemble's probabilities (mean over all peers), on the CPU.

    With replicas, each evaluates its shard of every test batch and the peer's replicas share
    their parts, so every replica ends with the whole test split, in the order of one worker.
    """
    model.eval()
    own, ensemble, labels = [], [], []
    for inputs, batch_labels in data.test_batches(batch_size, num_workers):
        start, stop = shard_bounds(len(batch_labels), shards, shard)
        if start == stop:  # a test batch smaller than the shard count: the whole shard group skips it
            own.append(torch.empty(0))
            ensemble.append(torch.empty(0))
            labels.append(batch_labels[:0])
            continue
        with autocast(precision, device):
            logits = model(inputs[start:stop].to(device, non_blocking=True))
        logits = logits.float()
        peer_logits = exchange(logits)
        own.append(logits.cpu())
        ensemble.append(torch.stack([l.softmax(dim=1) for l in peer_logits.values()]).mean(dim=0).cpu())
        labels.append(batch_labels[start:stop])
    replicas = gather_in_group((own, ensemble, labels), peer_group)
    # Batch by batch, shard by shard: the order of the test split.
    return tuple(torch.cat([part[kind][batch] for batch in range(len(own)) for part in replicas
                            if part[kind][batch].numel()])
                 for kind in range(3))


# --------------------------------------------------------------------------- the Ray Train entry point


def train_cohort(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the cohort's ``TorchTrainer``.

    ``config`` holds the resolved topology (as plain data), the torch thread count, the queue
    through which rank 0 sends each epoch's cohort metrics to the driver (``cohort.run``), and
    the metric expression rank 0 reports as ``objective`` (``cohort.tune``).
    """
    # Wall-clock times (comparable with the driver's) of the worker's start-up, sent with its first epoch.
    startup = {"worker_start": time.time()}
    import ray.train
    import ray.train.torch

    topology = topology_from_dict(config["topology"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    slot = slot_of(rank, topology.peer_names)
    peer, shard, shards = slot.peer, slot.shard, topology.replicas
    threads = config["threads"]
    torch.set_num_threads(threads[peer] if isinstance(threads, dict) else threads)
    progress = config.get("progress")
    objective = MetricExpression(config["objective"]) if config.get("objective") else None

    # The driver's copy through the object store when it sent one (cohort.run), else loaded here.
    data = ray.get(config["dataset"]) if config.get("dataset") is not None else load_dataset(topology.data)
    startup["data_loaded"] = time.time()
    info = data.info
    grouping = cohort_groups(topology, info)
    # Per-group metrics where the topology asks for groups (not for an ltkd edge's sake alone).
    metric_groups = grouping if grouping and (topology.data.groups or topology.data.long_tail) else (None, None)
    device = ray.train.torch.get_device() if topology.resources.use_gpu else torch.device("cpu")
    placement = worker_placement(rank, slot, device)
    # A checkpoint's weights as the driver read them, through the object store: the workers never
    # open the checkpoint's path (on a cluster, a file only the driver has).
    sent = (config.get("weights") or {}).get(peer)
    net = build_peer(topology, peer, info, ray.get(sent) if sent is not None else None).to(device)
    groups = grouping[0].to(device) if grouping else None
    frozen = topology.peers[peer].frozen
    backend = exchange_backend(topology.resources.use_gpu, topology.resources.gpus_per_worker)
    exchange_group, peer_group = grid_groups(topology.peer_names, shards, rank)
    replicas_train = peer_group is not None and not frozen
    if replicas_train and topology.peers[peer].sync_batchnorm:
        # Before the optimizer: the synchronized layers are new modules (with the same parameters' values).
        sync_batch_norm(net, peer_group, device.type, backend.host_copies)
    if frozen:
        for parameter in net.parameters():
            parameter.requires_grad_(False)
    optimizer, scheduler = (None, None) if frozen else build_optimizer(net, topology.optimizer_for(peer), topology)
    scaler = None if frozen else grad_scaler(topology.train.precision, device)
    exchange = LogitExchange(topology.peer_names, exchange_group, host_copies=backend.host_copies)
    workers = gather_in_group(placement, torch.distributed.group.WORLD)  # rank 0 reports them
    guard = BatchGuard(peer, shard, shards, topology.train.check_batches_every,
                       lambda record: gather_in_group(record, torch.distributed.group.WORLD))
    startup["model_built"] = time.time()

    first_epoch = 1
    history: list[dict[str, Any]] = []  # rank 0's reports so far, kept in its checkpoints
    # A restart (after a worker died) or a resumed run continues after the run's last checkpoint;
    # a Tune trial may start from one Tune hands it (PBT's exploit, a resumed sweep).
    checkpoint = ray.train.get_checkpoint() or config.get("initial_checkpoint")
    if checkpoint is not None:
        # Every replica of a peer reads the peer's one state.
        with checkpoint.as_directory() as folder:
            state = load_peer_state(folder, peer)
        net.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            apply_optimizer_settings(optimizer, scheduler, topology.optimizer_for(peer))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], device)
        first_epoch = int(state["epoch"]) + 1
        restore_guard(guard, state, shards)
        history = list(state.get("history", []))
        if progress is not None:
            # The driver may have stopped before logging the epochs this checkpoint covers: send
            # them again; it logs each epoch once.
            for report in history:
                progress.put(report)
    model = net
    if replicas_train:
        # Data parallelism within the peer's own replicas only: peers are different networks.
        model = nn.parallel.DistributedDataParallel(net, process_group=peer_group,
                                                    device_ids=[device.index] if device.type == "cuda" else None)
    run = PeerStep(topology, peer, model, optimizer, exchange, guard, groups, device, shard, scaler,
                   ReplicaBatch(peer_group, backend.host_copies) if replicas_train else WHOLE_BATCH)

    for epoch in range(first_epoch, topology.train.epochs + 1):
        started = time.perf_counter()
        try:
            stats = train_epoch(run, data, epoch)
        except NonFiniteLoss as error:
            raise CohortError(str(error)) from None
        if scheduler is not None:
            scheduler.step()
        train_seconds = time.perf_counter() - started
        stats = EpochStats.merged(gather_in_group(stats, peer_group))
        own_logits, ensemble_probs, test_labels = evaluate(net, data, exchange, topology.data.eval_batch_size,
                                                           topology.data.num_workers, device,
                                                           topology.train.precision, shard, shards, peer_group)
        contribution = peer_epoch_metrics(stats, own_logits, test_labels, train_seconds, guard.fingerprint,
                                          *metric_groups)
        if startup is not None:
            contribution["startup"] = {**startup, "first_step": stats.first_step_at}
            startup = None  # sent once, with the first epoch this worker runs
        everyone = exchange.gather_objects(contribution)

        report: dict[str, Any] = {}
        if rank == 0:
            report = cohort_report(topology, epoch, everyone,
                                   metrics.evaluate_probs(ensemble_probs, test_labels, *metric_groups))
            report["cohort/workers"] = workers
            if objective is not None:
                try:
                    report["objective"] = objective(report)
                except KeyError as error:
                    raise CohortError(f"metric: {error.args[0]}") from None
            history.append(report)
            if progress is not None:
                progress.put(report)
        last = epoch == topology.train.epochs
        # One state per peer, written by its first replica (the replicas' weights are equal).
        if shard == 0 and (last or epoch % topology.train.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as folder:
                save_peer_state(folder, peer, {
                    "epoch": epoch, "fingerprint": guard.fingerprint, "step": guard.step,
                    "shard_fingerprint": guard.shard_fingerprint, "rng": rng_state(device),
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else {},
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "history": history,
                })
                if last:
                    save_final(folder, peer, net, own_logits, test_labels, ensemble_probs if rank == 0 else None)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(report)


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


def peer_epoch_metrics(stats: EpochStats, logits: torch.Tensor, labels: torch.Tensor, seconds: float,
                       fingerprint: int, groups: torch.Tensor | None = None,
                       group_names: list[str] | None = None) -> dict[str, float]:
    """What one peer contributes to an epoch's report."""
    return {**stats.summary(), **metrics.evaluate(logits, labels, groups, group_names), "epoch_seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "fingerprint": fingerprint}


def report_keys(topology: Topology, info: DatasetInfo) -> list[str]:
    """The keys of an epoch's report, computed with the real metric code on dummy predictions."""
    grouping = cohort_groups(topology, info)
    metric_groups = grouping if grouping and (topology.data.groups or topology.data.long_tail) else (None, None)
    logits, labels = torch.randn(4, info.num_classes), torch.arange(4) % info.num_classes
    peer_metrics = peer_epoch_metrics(EpochStats(), logits, labels, 0.0, 0, *metric_groups)
    report = cohort_report(topology, 1, [peer_metrics] * len(topology.peers),
                           metrics.evaluate_probs(logits.softmax(dim=1), labels, *metric_groups))
    return sorted(key for key, value in report.items() if isinstance(value, float))


def cohort_report(topology: Topology, epoch: int, everyone: list[dict[str, float]],
                  ensemble: dict[str, float]) -> dict[str, Any]:
    """One epoch's metrics of the whole cohort, keyed ``<peer>/<metric>`` and ``ensemble/<metric>``."""
    report: dict[str, Any] = {"epoch": epoch}
    fingerprints = {}
    for peer, peer_metrics in zip(topology.peer_names, everyone):
        for key, value in peer_metrics.items():
            if key == "fingerprint":
                fingerprints[peer] = value
            else:
                report[f"{peer}/{key}"] = value
    for key, value in ensemble.items():
        report[f"ensemble/{key}"] = value
    report["cohort/batches_identical"] = float(len(set(fingerprints.values())) == 1)
    report["cohort/fingerprints"] = fingerprints
    return report


def save_final(folder: str, peer: str, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
               ensemble_probs: torch.Tensor | None) -> None:
    """The peer's weights and reliability diagram (PNG, and its bins as JSON for later comparisons);
    rank 0 adds the ensemble's."""
    torch.save({key: value.cpu() for key, value in model.state_dict().items()}, os.path.join(folder, f"{peer}.pt"))
    diagrams = [(peer, reliability.reliability_bins(logits, labels))]
    if ensemble_probs is not None:
        diagrams.append(("ensemble", reliability.reliability_bins_probs(ensemble_probs, labels)))
    for name, bins in diagrams:
        reliability.reliability_diagram(bins, os.path.join(folder, f"reliability_{name}.png"), title=name)
        with open(os.path.join(folder, f"reliability_{name}.json"), "w") as file:
            json.dump({field: getattr(bins, field).tolist() for field in ("edges", "counts", "accuracy", "confidence")},
                      file)
