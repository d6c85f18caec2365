"""Codistillation's exchange (``exchange.mode: snapshot``): peers that need not wait for each other.

Each peer publishes its weights every ``every`` of its own optimizer steps: one ``ray.put`` per
publication, whatever the number of readers, registered with the cohort's ``SnapshotBoard`` (one
small actor, ``cohort.worker.board``). A peer that learns from others holds a copy of each
teacher's network and computes the teacher's logits on its own batch from the newest snapshot it
may use. Versions count optimizer steps: version ``v`` is the weights after ``v`` steps (version 0:
the initial weights).

Which snapshot a reader at its step ``t`` (``t`` steps done) uses: the newest version ``<= t``,
never one from its own future (so that ``every: 1, staleness: 0`` reproduces lockstep exactly:
there, the logits a peer receives at step ``t`` come from the teacher's weights after ``t`` steps).
It waits only while that version is older than ``t - staleness``. A frozen teacher publishes once
and is never stale. The board keeps each peer's ``KEPT`` newest snapshots; a reader that fell
further behind a teacher than that reads the oldest kept (a version from its future:
``usable_version``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from cohort.worker.board import FROZEN

POLL_SECONDS = 0.002  # a waiting reader asks the board again this often


def is_fresh(version: float | None, step: int, staleness: int | None) -> bool:
    """Whether a reader at ``step`` may use ``version`` without waiting."""
    if version is None:
        return False
    return staleness is None or version == FROZEN or version >= step - staleness


def due(step: int, every: int) -> bool:
    """Whether a peer publishes after ``step`` optimizer steps (version 0 included)."""
    return step % every == 0


def publish(board, peer: str, version: float, model: nn.Module, replace: bool = False) -> None:
    """Put the peer's weights in the object store once and register them as ``version``."""
    import ray

    state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    ray.get(board.publish.remote(peer, version, [ray.put(state)], replace))


@dataclass
class TeacherStats:
    """One epoch of a reader's copies: per teacher, how many steps behind each step's copy was; the
    seconds spent computing the copies' logits and waiting for fresh enough snapshots."""

    behind: dict[str, list[float]] = field(default_factory=dict)
    forward_seconds: float = 0.0
    wait_seconds: float = 0.0


@dataclass(kw_only=True)
class TeacherCopies:
    """A reader's copies of its teachers' networks, refreshed from the board when a newer usable
    snapshot exists; their logits on the reader's batch, without gradients."""

    board: Any
    copies: dict[str, nn.Module]  # teacher -> its network (built like the teacher, on the reader's device)
    every: int
    staleness: int | None
    train_mode: bool = False  # batch norm on the batch's statistics (exchange.teachers: train)
    versions: dict[str, float | None] = field(default_factory=dict)
    stats: TeacherStats = field(default_factory=TeacherStats)

    def begin_epoch(self) -> TeacherStats:
        self.stats = TeacherStats(behind={teacher: [] for teacher in self.copies})
        return self.stats

    def logits(self, inputs: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Every teacher's logits on ``inputs`` for the reader's step ``step`` (steps done so far)."""
        out = {}
        for teacher, copy in self.copies.items():
            self._refresh(teacher, copy, step)
            version = self.versions[teacher]
            self.stats.behind[teacher].append(0.0 if version == FROZEN else float(step - version))
            started = time.perf_counter()
            copy.train(self.train_mode)
            with torch.no_grad():
                out[teacher] = copy(inputs).float()
            self.stats.forward_seconds += time.perf_counter() - started
        return out

    def _refresh(self, teacher: str, copy: nn.Module, step: int) -> None:
        import ray

        current = self.versions.get(teacher)
        if current == FROZEN or (current is not None and current > step - self.every and current <= step
                                 and is_fresh(current, step, self.staleness)):
            return  # no newer usable snapshot can exist yet
        started = time.perf_counter()
        while True:
            found = ray.get(self.board.usable.remote(teacher, step))
            if found is not None and is_fresh(found[0], step, self.staleness):
                break
            time.sleep(POLL_SECONDS)
        self.stats.wait_seconds += time.perf_counter() - started
        version, (reference,) = found
        if version != current:
            copy.load_state_dict(ray.get(reference))
            self.versions[teacher] = version
