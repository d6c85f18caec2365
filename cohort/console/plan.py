"""The plan's text: what a run will do (peers, models, parameters, edges, gates, resources, the
worker grid), printed before it starts and by ``--dry-run``, and the summary table at its end."""
from __future__ import annotations

from typing import Any

from cohort.config.errors import byte_size
from cohort.datasets.producer import WINDOW
from cohort.driver.launch import Plan
from cohort.topology import Topology
from cohort.worker.grid import exchange_backend, worker_grid
from cohort.worker.payload import whole_batch_exchange
from cohort.worker.report import ENSEMBLE, evaluated, metric_key


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


def describe_data(info, pipeline: str = "peers", bound: int | None = None, decoders: int = 0) -> str:
    """Which data pipeline runs, and what it holds in memory (``bound``: data.memory_bound; ``decoders``:
    data.decoders)."""
    if pipeline == "stream":
        return (f"data: streamed from its parquet files (data.pipeline: stream): one batch producer per node reads "
                f"a shuffle window of {info.stream_window} row groups and decodes each training batch once for the "
                f"workers there, {WINDOW} batches ahead; the driver decodes none of it; the producer holds at most "
                f"{byte_size(info.stream_bytes)}"
                + (f" (data.memory_bound {byte_size(bound)})" if bound is not None else "")
                + "; test batches: every worker reads and decodes its own, two row groups at a time")
    if pipeline == "producer":
        held = (f"the data in memory, shared through Ray's object store: {byte_size(info.memory_bytes)} once per "
                "node, loaded by the driver" if info.memory_bytes else "the files' list; it reads and decodes them")
        makers = (f"its {decoders} decoders spread over the cluster's nodes (data.decoders)" if decoders
                  else "one thread")
        return (f"data: one batch producer per node makes each training batch once for the workers there "
                f"(data.pipeline: producer; {makers}, no CPU reserved: the workers' decoding, done once), "
                f"{max(WINDOW, decoders)} batches ahead, shared through Ray's object store; "
                f"it holds {held}; test batches: every worker its own")
    if not info.memory_bytes:
        return "data: read from its files by every peer's worker, which decodes each batch itself"
    return (f"data: in memory, shared through Ray's object store: {byte_size(info.memory_bytes)} once per node "
            "(not per peer), loaded by the driver")


def describe_plan(plan: Plan) -> str:
    topology, info = plan.topology, plan.info
    # Columns as wide as their longest name, and a space after it: long names never run together.
    width = max(14, max(len(peer) for peer in topology.peer_names) + 1)
    model_width = max(16, max(len(config.model) for config in topology.peers.values()) + 1)
    lines = [
        f"{topology.name}: {len(topology.peers)} peer{'s' if len(topology.peers) > 1 else ''} on {info.name} "
        f"({info.train_size} train / {info.test_size} test images, {info.num_classes} classes), "
        f"{topology.train.epochs} epoch{'s' if topology.train.epochs > 1 else ''}, batch {topology.data.batch_size}, "
        f"seed {topology.seed}"
        + describe_sampler(topology)
        + (f", {topology.train.precision}" if topology.train.precision != "fp32" else ""),
        *(f"  note: {note}" for note in info.notes),
        *describe_classes(plan),
        f"  {describe_calibration(topology, info)}",
        f"  {describe_data(info, plan.pipeline, topology.data.memory_bound, topology.data.decoders)}",
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
        *(describe_snapshots(topology) if topology.exchange.snapshot else [
            f"  exchange: {backend.name}{' on host copies' if backend.host_copies else ''} ({backend.reason})",
            *describe_payload(plan)]),
        *describe_grid(topology),
        f"  tracking: experiment {topology.experiment!r} at {plan.tracking_uri}",
    ]
    return "\n".join(lines)


def describe_snapshots(topology: Topology) -> list[str]:
    """Codistillation's exchange (cohort.worker.snapshots), in the plan's words."""
    exchange = topology.exchange
    wait = ("never waits for a teacher" if exchange.staleness is None
            else f"waits when a teacher's copy is more than {exchange.staleness} steps behind")
    data = (f"each peer its own 1/{len(topology.peers)} of every epoch" if exchange.data == "disjoint"
            else "every peer on every batch")
    lines = [f"  exchange: snapshots: each peer publishes its weights every {exchange.every} of its steps and "
             f"computes its teachers' logits from copies ({exchange.teachers} mode); a peer {wait}",
             f"    data: {data}; distillation from step {exchange.burn_in + 1}" if exchange.burn_in
             else f"    data: {data}"]
    for peer in topology.peer_names:
        teachers = topology.teachers_of(peer)
        if teachers:
            lines.append(f"    {peer} holds copies of {', '.join(teachers)}")
    return lines


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


def describe_payload(plan: Plan) -> list[str]:
    """What each peer sends per step when representations travel (cohort.worker.payload)."""
    layout = plan.payload
    if layout is None:
        return []
    batch = plan.topology.data.batch_size
    gather = ("one all_gather over every worker: the whole batch's embeddings to each replica"
              if whole_batch_exchange(plan.topology) else "one all_gather")
    lines = [f"  exchanged per step (batch {batch}, {gather}, rows padded to the widest peer's "
             f"{layout.row} floats per image):"]
    # With replicas each worker sends its shard's rows, padded to the largest shard.
    replicas = plan.topology.replicas
    rows = -(-batch // replicas)
    for peer, parts in layout.parts.items():
        sent = ", ".join(f"{part.name} {part.width}" for part in parts)
        lines.append(f"    {peer}: {sent} floats per image; {layout.bytes_per_image(peer) * rows / 1024:,.1f} KiB"
                     + (f" per worker (its shard's {rows} images)" if replicas > 1 else ""))
    return lines


def describe_sampler(topology: Topology) -> str:
    sampler = topology.data.sampler
    if sampler is None:
        return ""
    return f", each batch {topology.data.batch_size // sampler.m_per_class} classes x {sampler.m_per_class} images"
