"""A step's decision from the topology's gates: which gates fire, which edges are off, who pauses.

Every worker holds every peer's logits after the exchange, so every worker computes the same
decision, with no collective of its own (with replicas, the gates' batch means reduce over the
peer's replicas: ``batch``). A gate that fires switches its teacher's edges from its student off;
a teacher all of whose gates fire takes no optimizer step (SwitOKD's expert mode; with one teacher
and several students, the authors' rule: the teacher pauses only when every student is in expert
mode, otherwise it learns from those in learning mode).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from cohort.losses.batch import WHOLE_BATCH, WholeBatch

from .registry import GATES

if TYPE_CHECKING:
    from cohort.topology.edges import Edge

    from .config import Gate


@dataclass(frozen=True)
class StepDecision:
    fired: tuple[bool, ...]  # per gate, in the topology's order
    paused: frozenset[str]  # peers that take no optimizer step
    off: frozenset[tuple[str, str]]  # (teacher, student): the teacher's edges from the student are off

    def edges_off(self, peer: str, edges: Sequence[Edge]) -> frozenset[int]:
        """Indices into ``edges`` (the edges into ``peer``) that are off this step."""
        return frozenset(index for index, edge in enumerate(edges)
                         if len(edge.senders) == 1 and (peer, edge.senders[0]) in self.off)


def decide(gates: Sequence[Gate], peer_logits: Mapping[str, Tensor], target: Tensor,
           batch: WholeBatch = WHOLE_BATCH, states: Sequence[dict[str, Any]] | None = None) -> StepDecision:
    """The step's decision from every peer's logits and the labels (a shard of them with replicas:
    then ``batch`` reduces over the whole batch)."""
    context = {"target": target}
    fired = []
    for index, gate in enumerate(gates):
        spec = GATES[gate.rule]
        extra: dict[str, Any] = {name: context[name] for name in spec.context}
        if spec.batch_statistics:
            extra["batch"] = batch
        if spec.stateful:
            extra["state"] = states[index] if states is not None else {}
        fired.append(bool(spec.fn(peer_logits[gate.teacher].detach(), peer_logits[gate.student].detach(),
                                  **extra, **gate.params)))
    teachers = dict.fromkeys(gate.teacher for gate in gates)
    paused = frozenset(teacher for teacher in teachers
                       if all(on for gate, on in zip(gates, fired) if gate.teacher == teacher))
    off = frozenset((gate.teacher, gate.student) for gate, on in zip(gates, fired) if on)
    return StepDecision(tuple(fired), paused, off)


class Gating:
    """A worker's gates: the step's decision, and the state the stateful ones keep (in checkpoints)."""

    def __init__(self, gates: Sequence[Gate], batch: WholeBatch = WHOLE_BATCH):
        self.gates = tuple(gates)
        self.batch = batch
        self.states: list[dict[str, Any]] = [{} for _ in self.gates]

    def __call__(self, peer_logits: Mapping[str, Tensor], target: Tensor) -> StepDecision:
        return decide(self.gates, peer_logits, target, self.batch, self.states)

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(state) for state in self.states]

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        if len(states) != len(self.gates):
            raise ValueError(f"the checkpoint holds the state of {len(states)} gates, the topology has {len(self.gates)}")
        self.states = [dict(state) for state in states]
