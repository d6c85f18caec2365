"""The batch guard: every worker must train on the same batches (and, with replicas, on its own
disjoint part of each), or the peers would distill from predictions on other images.

Each worker keeps a running CRC of every whole batch and of its own shard. Every
``train.check_batches_every`` steps, counted over the whole run (a resumed run continues the
count), and at the end of every epoch, all workers compare: a mismatch stops the run with one line
naming the workers and the step. The comparison itself is a pure function (``find_mismatch``).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cohort.config.errors import CohortError


def batch_fingerprint(running: int, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """A running CRC of every batch's bytes: equal on all workers exactly when they saw the same data."""
    running = zlib.crc32(inputs.detach().cpu().contiguous().numpy().tobytes(), running)
    return zlib.crc32(labels.cpu().numpy().tobytes(), running)


@dataclass
class BatchGuard:
    """One worker's fingerprints and step count. ``gather`` collects one object from every worker
    of the run (``all_gather_object`` over the whole world), in rank order."""

    peer: str
    replica: int
    replicas: int
    every: int  # steps between checks; 0: off
    gather: Callable[[Any], list[Any]]
    step: int = 0  # steps over the whole run
    fingerprint: int = 0  # of every whole batch so far
    shard_fingerprint: int = 0  # of this worker's shards so far
    bounds: tuple[int, int, int] = (0, 0, 0)  # the last batch's shard: start, stop, batch size

    def see(self, inputs: torch.Tensor, labels: torch.Tensor, start: int, stop: int) -> bool:
        """Record one whole batch and this worker's ``[start, stop)`` of it; True when a check is due."""
        self.step += 1
        self.fingerprint = batch_fingerprint(self.fingerprint, inputs, labels)
        # Without replicas the shard is the whole batch: one CRC per step, not two.
        self.shard_fingerprint = self.fingerprint if self.replicas == 1 else batch_fingerprint(
            self.shard_fingerprint, inputs[start:stop], labels[start:stop])
        self.bounds = (start, stop, len(labels))
        return bool(self.every) and self.step % self.every == 0

    def record(self) -> dict[str, Any]:
        return {"peer": self.peer, "replica": self.replica, "batch": self.fingerprint,
                "shard": self.shard_fingerprint, "bounds": self.bounds}

    def check(self, epoch: int) -> None:
        """Compare with every other worker (collective: every worker calls it at the same step)."""
        self.check_record(self.record(), self.step, epoch)

    def check_record(self, record: dict[str, Any], step: int, epoch: int) -> None:
        """Compare ``record``, taken at ``step``, with every other worker's of the same step
        (collective); codistillation's reporter compares an epoch's end while training goes on."""
        if not self.every:
            return
        problem = find_mismatch(self.gather(record), self.replicas)
        if problem:
            raise CohortError(f"the training batches differ at step {step} (epoch {epoch}): {problem}; "
                              "every peer must load the same data")


def find_mismatch(records: list[dict[str, Any]], replicas: int = 1) -> str | None:
    """What is wrong with the workers' fingerprints, in words, or None when they agree.

    Every worker's whole batches must agree; the workers of one shard (one of every peer) must
    have trained on the same shards; and each peer's replicas must hold disjoint parts that
    together make the whole batch.
    """
    def name(record: dict[str, Any]) -> str:
        return f"{record['peer']} (replica {record['replica']})" if replicas > 1 else str(record["peer"])

    def disagreement(key: str, group: list[dict[str, Any]]) -> str | None:
        by_value: dict[int, list[str]] = {}
        for record in group:
            by_value.setdefault(record[key], []).append(name(record))
        if len(by_value) == 1:
            return None
        parts = sorted(by_value.values(), key=len)
        if len(parts[0]) < len(parts[1]):  # one smallest group: the odd one out
            return f"{', '.join(parts[0])} saw other data than {', '.join(w for part in parts[1:] for w in part)}"
        return f"{' / '.join(', '.join(part) for part in parts)} saw different data"

    problem = disagreement("batch", records)
    if problem or replicas == 1:
        return problem
    for shard in range(replicas):
        problem = disagreement("shard", [r for r in records if r["replica"] == shard])
        if problem:
            return f"in shard {shard}, {problem}"
    for peer in dict.fromkeys(r["peer"] for r in records):
        spans = sorted(r["bounds"] for r in records if r["peer"] == peer)
        size = spans[0][2]
        stops = [0] + [stop for _, stop, _ in spans]
        if any(start != stops[i] for i, (start, _, _) in enumerate(spans)) or stops[-1] != size or \
                any(span[2] != size for span in spans):
            return f"the replicas of {peer} do not split the batch into disjoint shards ({spans})"
    return None
