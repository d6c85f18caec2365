"""One cohort run as the comparison sees it: peers in rank order, edges, final metrics; and what the
table derives from them (a peer's method, model and gap to its best sender)."""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cohort.topology import Topology

ENSEMBLE = "ensemble"
NOT_PEERS = {ENSEMBLE, "cohort"}  # metric prefixes that are not peers
ENSEMBLE_MODEL = "(mean of probs)"
SHORT_ID = 8


@dataclass(frozen=True)
class Edge:
    senders: tuple[str, ...]
    receiver: str
    loss: str


@dataclass
class CohortRun:
    """One cohort run as the comparison needs it: its peers in rank order, the resolved topology's
    params and its final (last-step) metrics; ``logged_edges`` are the edges of the run's own
    ``topology.yaml`` artifact, None for a run without one (then the params give them)."""

    run_id: str
    experiment: str
    peers: tuple[str, ...]
    params: dict[str, str]
    metrics: dict[str, float]
    has_ensemble: bool
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    logged_edges: tuple[Edge, ...] | None = None

    @property
    def short(self) -> str:
        return self.run_id[:SHORT_ID]

    @property
    def label(self) -> str:
        return f"{self.experiment} {self.short}"

    @property
    def members(self) -> tuple[str, ...]:
        """The rows of this run: its peers, then the ensemble."""
        return self.peers + ((ENSEMBLE,) if self.has_ensemble else ())

    @property
    def edges(self) -> list[Edge]:
        """The topology's edges in file order: from the logged topology.yaml, else from the params."""
        return list(self.logged_edges) if self.logged_edges is not None else edges_of(self.params)

    def metric(self, member: str, key: str) -> float | None:
        value = self.metrics.get(f"{member}/{key}")
        return value if value is not None and math.isfinite(value) else None


def reported_peers(metrics: dict[str, float]) -> set[str]:
    return {key.split("/", 1)[0] for key in metrics if key.endswith("/acc")} - NOT_PEERS


def rank_order(peers: set[str], rank_tag: str | None) -> tuple[str, ...]:
    """The peers in worker rank order (the ``cohort.peers`` tag); any the tag does not name, after."""
    ranked = [peer for peer in (rank_tag or "").split(",") if peer in peers]
    return tuple(ranked + sorted(peers - set(ranked)))


def overlay(base: dict[str, str], override: dict[str, str]) -> dict[str, str]:
    """``base`` with ``override``'s keys replacing whole subtrees: a trial's ``edges.1.from`` replaces
    its parent's ``edges.1.from.ensemble`` and the other way round."""
    merged = {key: value for key, value in base.items()
              if not any(key.startswith(new + ".") or new.startswith(key + ".") for new in override)}
    merged.update(override)
    return merged


def topology_edges(topology: Topology) -> tuple[Edge, ...]:
    """The edges of a ``cohort.topology.Topology``, in file order."""
    return tuple(Edge(tuple(edge.senders), edge.to, edge.loss) for edge in topology.edges)


def edges_of(params: dict[str, str]) -> list[Edge]:
    """The topology's edges, in file order, from its flattened params.

    Only for runs without a topology.yaml artifact (runs logged before sweep trials logged theirs):
    the params of a trial are its sampled values over its parent's, and a list comes back as text.
    """
    found: dict[int, dict[str, Any]] = {}
    for key, value in params.items():
        match = re.fullmatch(r"edges\.(\d+)\.(from|from\.ensemble|to|loss)", key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    edges = []
    for index in sorted(found):
        parts = found[index]
        if "to" not in parts or "loss" not in parts:
            continue
        senders = ensemble_members(parts["from.ensemble"]) if "from.ensemble" in parts else (parts.get("from"),)
        edges.append(Edge(tuple(sender for sender in senders if sender), parts["to"], parts["loss"]))
    return edges


def ensemble_members(text: str) -> tuple[str, ...]:
    """An ensemble sender's peers from MLflow's string of a Python list, "['a', 'b']"."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ()
    return tuple(str(peer) for peer in value) if isinstance(value, (list, tuple)) else ()


def method_of(params: dict[str, str], peer: str, edges: list[Edge] | None = None) -> str:
    """The peer's losses (of the edges into it, ``edges`` or else the params' edges), "frozen" or "ce"."""
    if peer == ENSEMBLE:
        return ""
    if params.get(f"peers.{peer}.frozen") == "True":
        return "frozen"
    edges = edges_of(params) if edges is None else edges
    return "+".join(edge.loss for edge in edges if edge.receiver == peer) or "ce"


def model_of(params: dict[str, str], peer: str) -> str:
    return ENSEMBLE_MODEL if peer == ENSEMBLE else params.get(f"peers.{peer}.model", "")


def gap_of(run: CohortRun, peer: str) -> float | None:
    """Top-1 of the best peer sending into ``peer`` (an ensemble sender counts its members) minus the
    peer's own, in percentage points; None without an incoming edge."""
    own = run.metric(peer, "acc")
    senders = {sender for edge in run.edges if edge.receiver == peer for sender in edge.senders}
    accuracies = [acc for acc in (run.metric(sender, "acc") for sender in senders) if acc is not None]
    if own is None or not accuracies:
        return None
    return 100 * (max(accuracies) - own)
