"""Where the time before a cohort's first optimizer step goes.

The driver marks when the training was asked for (a command's process start, its interpreter and
imports included; from Python, the call to ``cohort.train``) and when Ray was up; every worker marks
when it started, when its data were loaded, when its model was built and when its first step ended
(wall-clock times, comparable on one machine). The cohort passes a milestone when its last peer
does, so the parts below follow one another and add up to the time to the first step.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

# (part, the milestone that ends it), in order; the driver's marks, then the workers' latest ones.
PARTS = (
    ("driver", "ray_start"),        # interpreter, imports, topology, plan, MLflow run
    ("ray", "ray_ready"),           # starting or joining Ray
    ("workers", "worker_start"),    # Ray Train's controller, worker processes, process group
    ("data", "data_loaded"),        # each worker loads (decodes) its dataset
    ("models", "model_built"),      # model, optimizer, exchange
    ("first_step", "first_step"),   # the first batch, forward, exchange, backward, step
)


# (when, what happened then) for the trainings started in this context (``asked_at``).
_ASKED: ContextVar[tuple[float, str] | None] = ContextVar("cohort_training_asked", default=None)
COMMAND_STARTED = "the command started"
TRAIN_CALLED = "cohort.train was called"
RAY_STARTED = "Ray's start began"


def process_started() -> float:
    """When this process started (``time.time()`` scale): the command's start, imports included."""
    import psutil

    return psutil.Process().create_time()


@contextlib.contextmanager
def asked_at(moment: float | None = None, what: str = TRAIN_CALLED) -> Iterator[None]:
    """The trainings started inside were asked for at ``moment`` (default: now), when ``what``
    happened (the breakdown's line says it), unless an outer block already says when: a command
    (``moment``: its process's start, ``what``: COMMAND_STARTED) calling ``cohort.train``."""
    if _ASKED.get() is not None:
        yield
        return
    token = _ASKED.set((time.time() if moment is None else moment, what))
    try:
        yield
    finally:
        _ASKED.reset(token)


def training_asked(default: float) -> float:
    """When the training starting now was asked for (``asked_at``), else ``default``."""
    asked = _ASKED.get()
    return default if asked is None else asked[0]


def asked_since() -> str:
    """What the start-up breakdown counts from here: a command's start, a call to ``cohort.train``,
    or (outside both) Ray's start."""
    asked = _ASKED.get()
    return RAY_STARTED if asked is None else asked[1]


def driver_marks(process_start: float, ray_start: float, ray_ready: float) -> dict[str, float]:
    return {"command": process_start, "ray_start": ray_start, "ray_ready": ray_ready}


def startup_breakdown(marks: Mapping[str, float], workers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Seconds spent in each part before the first step, and ``total``; empty if a worker has no mark
    (a worker without a training step, or a start-up that is not this driver's)."""
    milestones = dict(marks)
    for name in ("worker_start", "data_loaded", "model_built", "first_step"):
        times = [worker.get(name) for worker in workers.values()]
        if not times or any(t is None for t in times):
            return {}
        milestones[name] = max(times)
    if milestones["worker_start"] < milestones["ray_ready"]:
        return {}  # these workers started before this driver's Ray did (a report replayed after a resume)
    breakdown, previous = {}, milestones["command"]
    for part, milestone in PARTS:
        breakdown[part] = max(0.0, milestones[milestone] - previous)
        previous = max(previous, milestones[milestone])
    breakdown["total"] = milestones["first_step"] - milestones["command"]
    return breakdown


def describe_startup(breakdown: Mapping[str, float], since: str = COMMAND_STARTED) -> str:
    """The breakdown in one line, counted from ``since`` (``asked_since``)."""
    parts = ", ".join(f"{part.replace('_', ' ')} {breakdown[part]:.1f}s" for part, _ in PARTS)
    return f"first step {breakdown['total']:.1f}s after {since} ({parts})"
