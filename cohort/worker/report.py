"""An epoch's report: what every peer contributes, and the cohort's report that rank 0 sends the
driver, MLflow and Tune.

One place for the convention of its keys: ``<peer>/<metric>`` for each peer, ``ensemble/<metric>``
for the mean of the peers' probabilities, ``cohort/<name>`` for the run as a whole, ``objective``
for a sweep's metric, and ``epoch``. ``ensemble`` and ``cohort`` are reserved: no peer takes them
(cohort.topology refuses them).

Light to import (torch and the metrics load where a report is made): the command lines use its names.
"""
from __future__ import annotations

import os
import resource
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cohort.datasets import DatasetInfo
    from cohort.topology import Topology

ENSEMBLE = "ensemble"  # the mean of the peers' probabilities
COHORT = "cohort"  # the run as a whole
RESERVED = (ENSEMBLE, COHORT)
OBJECTIVE = "objective"  # a sweep's metric, as rank 0 computes it (cohort.tuning.sweep)
EPOCH = "epoch"


def metric_key(owner: str, metric: str) -> str:
    """The report's key of ``metric`` of ``owner``: a peer, ``ensemble`` or ``cohort``."""
    return f"{owner}/{metric}"


def cohort_key(name: str) -> str:
    return metric_key(COHORT, name)


def ensemble_key(metric: str) -> str:
    return metric_key(ENSEMBLE, metric)


def evaluated(topology: Topology) -> list[str]:
    """Whose test metrics a report holds: every peer, then the ensemble."""
    return [*topology.peer_names, ENSEMBLE]


def is_metric(key: str) -> bool:
    """Whether a report's key is a metric of a peer, the ensemble or the cohort (not ``epoch``,
    ``objective`` or what Tune adds)."""
    return "/" in key


def metric_groups(topology: Topology, grouping) -> tuple[Any, Any]:
    """The class groups of the per-group metrics, (groups, names), where the topology asks for
    groups (not for an ltkd edge's sake alone); else (None, None)."""
    return grouping if grouping and (topology.data.groups or topology.data.long_tail) else (None, None)


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
    # With gates (cohort.gates), a training peer's steps without an optimizer step, and per gate on
    # it (as teacher) the steps in which the gate fired, by metric name; None without gates.
    paused_steps: int | None = None
    gate_steps: dict[str, int] = field(default_factory=dict)
    # Bytes this peer put into each step's exchange (logits, and the representations edges need).
    exchange_bytes: list[int] = field(default_factory=list)
    # Seconds the training loop spent waiting for its next batch over the epoch (in the iterator's
    # next(): with data.num_workers 0, the batch's making itself).
    data_wait_seconds: float = 0.0
    # Codistillation (cohort.worker.snapshots.TeacherStats): how stale the teachers' copies were, the
    # time their logits and the waits for fresh snapshots took; None in lockstep.
    teachers: Any = None

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss * len(labels)
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.seen += len(labels)
        self.steps += 1

    def count_gates(self, peer: str, decision, gates) -> None:
        """Count one step's gate decision (cohort.gates.decision.StepDecision) for ``peer``."""
        self.paused_steps = (self.paused_steps or 0) + (peer in decision.paused)
        for gate, fired in zip(gates, decision.fired):
            if gate.teacher == peer:
                self.gate_steps[gate.expert_metric] = self.gate_steps.get(gate.expert_metric, 0) + fired

    def summary(self) -> dict[str, float]:
        summary = {"train_loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct / max(self.seen, 1),
                   "step_seconds": _median(self.step_seconds), "exchange_seconds": _median(self.exchange_seconds),
                   "step_cpu_seconds": _median(self.step_cpu_seconds), "exchange_bytes": _median(self.exchange_bytes),
                   "data_wait_seconds": self.data_wait_seconds}
        if self.teachers is not None:
            summary.update(teacher_summary(self.teachers))
        if self.paused_steps is not None:
            summary["paused"] = self.paused_steps / max(self.steps, 1)
            summary.update((key, count / max(self.steps, 1)) for key, count in self.gate_steps.items())
        return summary

    @classmethod
    def for_peer(cls, topology: Topology, peer: str) -> EpochStats:
        """An epoch's empty record for ``peer``: with the gate counts where it has gates to count."""
        if not topology.gates or topology.peers[peer].frozen:
            return cls()
        return cls(paused_steps=0, gate_steps={gate.expert_metric: 0 for _, gate in topology.gates_on(peer)})

    @classmethod
    def merged(cls, replicas: list[EpochStats]) -> EpochStats:
        """A peer's epoch over all its replicas' shards (its timings: the first replica's)."""
        first = replicas[0]
        # The replicas of a peer take the same gate decisions: the first's counts are everyone's.
        return cls(loss_sum=sum(r.loss_sum for r in replicas), correct=sum(r.correct for r in replicas),
                   seen=sum(r.seen for r in replicas), steps=max(r.steps for r in replicas),
                   step_seconds=first.step_seconds, exchange_seconds=first.exchange_seconds,
                   step_cpu_seconds=first.step_cpu_seconds, first_step_at=first.first_step_at,
                   paused_steps=first.paused_steps, gate_steps=dict(first.gate_steps), teachers=first.teachers,
                   exchange_bytes=first.exchange_bytes, data_wait_seconds=first.data_wait_seconds)


def teacher_summary(teachers) -> dict[str, float]:
    """A codistilling peer's epoch: per teacher, the mean steps its copy was behind
    (``staleness_<teacher>``); the seconds spent on the copies' logits (``teacher_seconds``) and
    waiting for fresh enough snapshots (``snapshot_wait_seconds``)."""
    summary = {f"staleness_{teacher}": statistics.fmean(behind) if behind else 0.0
               for teacher, behind in teachers.behind.items()}
    summary["teacher_seconds"] = teachers.forward_seconds
    summary["snapshot_wait_seconds"] = teachers.wait_seconds
    return summary


def _median(values: list[float]) -> float:
    # The median leaves out the first steps' warm-up and the odd step slowed by other processes.
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024)


def peer_epoch_metrics(stats: EpochStats, logits: torch.Tensor, labels: torch.Tensor, seconds: float,
                       fingerprint: int, groups: torch.Tensor | None = None,
                       group_names: list[str] | None = None) -> dict[str, float]:
    """What one peer contributes to an epoch's report."""
    from cohort.metrics import scores as metrics

    return {**stats.summary(), **metrics.evaluate(logits, labels, groups, group_names), "epoch_seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "fingerprint": fingerprint}


def report_keys(topology: Topology, info: DatasetInfo) -> list[str]:
    """The keys of an epoch's report, computed with the real metric code on dummy predictions (the
    last epoch's: with a validation split, the temperature-scaled metrics too)."""
    import torch

    from cohort.metrics import scores as metrics
    from cohort.metrics.temperature import (
        log_probs_of,
        scaled_metrics,
        validation_metrics,
    )
    from cohort.worker.peer import cohort_groups

    groups = metric_groups(topology, cohort_groups(topology, info))
    logits, labels = torch.randn(4, info.num_classes), torch.arange(4) % info.num_classes
    everyone = [peer_epoch_metrics(EpochStats.for_peer(topology, peer), logits, labels, 0.0, 0, *groups)
                for peer in topology.peer_names]
    ensemble = metrics.evaluate_probs(logits.softmax(dim=1), labels, *groups)
    if topology.data.val_fraction:
        for scores, outs in ((logits, everyone), (log_probs_of(logits.softmax(dim=1)), [ensemble])):
            extra = {**validation_metrics(scores, labels), **scaled_metrics(scores, labels, scores, labels, *groups)}
            for out in outs:
                out.update(extra)
    report = cohort_report(topology, 1, everyone, ensemble)
    return sorted(key for key, value in report.items() if isinstance(value, float))


def cohort_report(topology: Topology, epoch: int, everyone: list[dict[str, float]],
                  ensemble: dict[str, float]) -> dict[str, Any]:
    """One epoch's metrics of the whole cohort, keyed ``<peer>/<metric>`` and ``ensemble/<metric>``."""
    report: dict[str, Any] = {EPOCH: epoch}
    fingerprints = {}
    for peer, peer_metrics in zip(topology.peer_names, everyone):
        for key, value in peer_metrics.items():
            if key == "fingerprint":
                fingerprints[peer] = value
            else:
                report[metric_key(peer, key)] = value
    for key, value in ensemble.items():
        report[ensemble_key(key)] = value
    if topology.exchange.data != "disjoint":  # disjoint data: each peer its own batches, by design
        report[cohort_key("batches_identical")] = float(len(set(fingerprints.values())) == 1)
    report[cohort_key("fingerprints")] = fingerprints
    return report
