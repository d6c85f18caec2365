"""cohort's Python API: what the commands do, for a notebook or a script.

    import cohort
    topology = cohort.load_topology("topologies/three_peers.yaml", overrides={"train.epochs": 3})
    result = cohort.train(topology, tracking_uri="sqlite:///mlflow.db")  # blocks; shows its progress
    result.run_id, result.metrics["student_a/ece"], result.model("student_a")

Errors are ``cohort.CohortError``, with the one-line message the commands print. Importing cohort
imports nothing heavy: torch, Ray and MLflow load when a function needs them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohort.config.errors import CohortError

if TYPE_CHECKING:
    from cohort.console.display import Display
    from cohort.driver.cluster import RayOptions
    from cohort.driver.training import Trained
    from cohort.topology import Topology

__all__ = ["CohortError", "load_topology", "train"]

DISPLAYS = ("auto", "tty", "log", "json", "quiet")


def load_topology(path: str | Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Topology:
    """Read and validate a topology file; ``overrides`` as ``{"train.epochs": 3}`` or ``--set``'s
    ``["train.epochs=3"]``, validated again with them applied."""
    from cohort.topology import load_topology as load

    return load(path, overrides)


def train(topology: Topology, *, tracking_uri: str | None = None, storage: str | None = None,
          address: str | None = None, register: Mapping[str, str] | Iterable[str] = (),
          display: str | Display = "auto", ray: RayOptions | None = None) -> Trained:
    """Train the cohort as ``python -m cohort.run`` does and return its result: ``run_id``,
    ``metrics`` (the final epoch's, e.g. ``"student/acc"``), ``peers``, ``model(peer)`` (the trained
    ``torch.nn.Module``). ``tracking_uri``: the MLflow store (default: the topology's, else
    ``sqlite:///mlflow.db`` here); ``storage``: Ray Train's checkpoints; ``address``: a Ray cluster to
    join ('auto' or HOST:PORT; default: a new Ray on this machine, or the one already running in this
    process); ``register``: {peer: registered model name}; ``display``: 'auto' (a terminal's bar, else
    log lines), 'log', 'json' or 'quiet'."""
    import os

    from cohort.console.display import Display, choose_mode
    from cohort.driver.cluster import RayOptions
    from cohort.driver.launch import fetch_checkpoints
    from cohort.driver.training import start_run
    from cohort.tracking.logged_models import parse_registrations
    from cohort.tracking.tracker import resolve_uri

    if isinstance(display, str):
        if display not in DISPLAYS:
            raise CohortError(f"display {display!r}: one of {', '.join(DISPLAYS)}")
        display = Display(choose_mode() if display == "auto" else display)
    items = [f"{peer}={name}" for peer, name in register.items()] if isinstance(register, Mapping) else list(register)
    registrations = parse_registrations(items, topology)
    uri = resolve_uri(tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), uri)
    return start_run(topology, uri, ray or RayOptions(address=address), storage, registrations, display)
