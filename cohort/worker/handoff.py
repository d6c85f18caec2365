"""Codistillation's epoch reports, off the training thread (``exchange.mode: snapshot``).

In lockstep every worker ends each epoch in step with the others: the test split's evaluation
gathers every peer's logits, rank 0 gathers the metrics, and Ray Train's ``report`` is itself a
barrier across the workers. With snapshots that would tie a fast peer to the slowest one at every
epoch's end. So a codistilling worker's training thread hands each epoch over (a ``Handoff``:
copies of what the report reads, taken when the epoch's training ended) to the worker's
``Reporter`` thread and goes straight on with the next epoch; the reporter evaluates the copy,
joins the collectives and reports to Ray Train, epoch by epoch, in order. After the start the
reporter is the worker's only thread that issues collectives, so the workers' collectives stay in
one order.

The queue is not bounded: a peer may run any number of epochs ahead of the reports (each pending
epoch holds a copy of its weights, and of its training state when a checkpoint is due). A failed
report stops the reporter; the training thread raises its error at its next epoch's end, or when
it waits for the reports at the end of training.
"""
from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn


@dataclass(frozen=True, kw_only=True)
class Handoff:
    """One epoch of one peer as its training ended: what the epoch's report and checkpoint read,
    copied (the training thread changes the originals in place from its next step on)."""

    epoch: int
    stats: Any  # the epoch's EpochStats (a new one every epoch: not shared with the next)
    train_seconds: float
    train_ended_at: float  # time.time() when the epoch's training ended
    weights: dict[str, Any]  # a copy of the peer's state_dict, for the evaluation
    guard: tuple[dict[str, Any], int]  # the batch guard's record and step count at the epoch's end
    state: dict[str, Any] | None = None  # a copy of the training state for the checkpoint, when one is due


def copied_weights(model: nn.Module) -> dict[str, Any]:
    """The module's state_dict as tensors of their own (a state_dict's tensors share the weights' storage)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def copied_state(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a training state: an optimizer's ``state_dict`` holds its live momentum buffers."""
    return copy.deepcopy(state)


def epochs_ahead(latest: int, epoch: int) -> int:
    """How many epochs the training thread had handed over beyond the one being reported."""
    return latest - epoch


class Reporter:
    """A thread that calls ``report(item, latest)`` for each item submitted, in order; ``latest`` is
    the newest epoch submitted so far. ``submit`` never waits for a report; ``close`` waits for
    them all. The first error of a report stops the thread, and ``submit`` or ``close`` raise it
    (the same exception) on the training thread."""

    def __init__(self, report: Callable[[Any, int], None], name: str = "cohort-reporter"):
        self._report = report
        self._items: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.latest = 0
        # A daemon: a failing training thread ends the worker without waiting for a blocked report.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, epoch: int, item: Any) -> None:
        self.raise_error()
        self.latest = epoch
        self._items.put(item)

    def close(self) -> None:
        """Wait for every report submitted; raise the reporter's error if it had one."""
        self._items.put(None)
        self._thread.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self._items.get()) is not None:
            try:
                self._report(item, self.latest)
            except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
                self.error = error
                return
