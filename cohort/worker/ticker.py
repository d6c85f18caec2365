"""Rank 0's step counter: a small message a few times a second at most, that the driver's display
turns into a progress bar inside an epoch (``cohort.console.display``). A step message has a ``step``
key and no ``epoch`` key; an epoch report has ``epoch``."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

STEP = "step"  # the key of a step message; an epoch report has "epoch" instead
TICK_SECONDS = 0.25  # rank 0 sends the step counter at most this often


def step_message(epoch: int, step: int, steps: int, images: int, seconds: float) -> dict[str, Any]:
    """Rank 0's step counter for the driver: ``step`` of ``steps`` of ``epoch`` (under ``in_epoch``,
    never ``epoch``: the driver tells it from a report by that), ``images`` trained on so far this
    epoch (whole batches), ``seconds`` since the epoch's first batch was asked for."""
    return {STEP: step, "steps": steps, "in_epoch": epoch, "images": images, "seconds": seconds}


def is_step(message: dict[str, Any]) -> bool:
    return STEP in message and "epoch" not in message


def epoch_steps(train_size: int, batch_size: int, shards: int = 1, whole_batches: bool = False) -> int:
    """How many steps an epoch has (cohort.datasets.base.batch_indices: a too-small last batch
    is folded into the one before; ``whole_batches``: a class-balanced sampler's epoch, whole
    batches only, cohort.datasets.sampling)."""
    if whole_batches:
        return train_size // batch_size
    steps = -(-train_size // batch_size)
    last = train_size - (steps - 1) * batch_size
    return steps - 1 if steps > 1 and last < max(2, shards) else steps




class StepTicker:
    """Rank 0's side: counts the steps of an epoch and sends the count through ``send`` at most
    every ``interval`` seconds (and at the epoch's last step). A clock read per step otherwise."""

    def __init__(self, send: Callable[[dict[str, Any]], Any], steps: int, interval: float = TICK_SECONDS,
                 now: Callable[[], float] = time.perf_counter):
        self.send, self.steps, self.interval, self.now = send, steps, interval, now
        self.epoch, self.images, self.started, self.last = 0, 0, 0.0, -math.inf

    def begin(self, epoch: int) -> None:
        self.epoch, self.images, self.started, self.last = epoch, 0, self.now(), -math.inf

    def tick(self, step: int, batch_images: int) -> None:
        self.images += batch_images
        now = self.now()
        if now - self.last >= self.interval or step >= self.steps:
            self.last = now
            self.send(step_message(self.epoch, step, self.steps, self.images, now - self.started))


def queue_sender(progress) -> Callable[[dict[str, Any]], Any]:
    """Send to a ``ray.util.queue.Queue`` without waiting for the queue's actor (fire and forget:
    the step never waits on the driver)."""
    return lambda message: progress.actor.put_nowait.remote(message)
