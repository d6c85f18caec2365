"""A decorator registry of gates: rules that decide, once per step, from the exchanged logits,
whether a peer learns from another this step (formulas and provenance: docs/gates.md).

A gate is registered by one line, ``@register_gate("name")``, and its signature is its schema:

- the first two positional parameters are ``teacher_logits`` and ``student_logits``: the topology
  names the two peers with the keys ``teacher`` and ``student``;
- ``target`` (the labels) is supplied per step by the trainer;
- ``batch`` (default ``WHOLE_BATCH``) marks a gate that takes batch means (``cohort.losses.batch``):
  with replicas the trainer passes one that reduces over the whole batch;
- ``state`` (default ``None``) marks a gate that keeps state between steps: the trainer passes it a
  dict of its own, which it may change, and keeps it in the checkpoints;
- every other parameter is a topology key of the gate, with its default read from the signature.

The gate returns a bool: True when the rule *fires*, i.e. the teacher holds back for this step:
the edges from the student into the teacher are off, and a teacher all of whose gates fire takes
no optimizer step at all (``cohort.gates.decision``).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cohort.config.signatures import read_signature
from cohort.losses.batch import WHOLE_BATCH

ROLES = ("teacher", "student")
ROLE_PARAMETERS = tuple(f"{role}_logits" for role in ROLES)
CONTEXT_NAMES = ("target",)
BATCH_NAME = "batch"
STATE_NAME = "state"
# The keys of a gate in a topology (cohort.gates.config.GateConfig): no parameter may be named so.
GATE_FIELD_NAMES = ("rule", *ROLES)


@dataclass(frozen=True)
class GateSpec:
    name: str
    fn: Callable[..., bool]
    params: dict[str, object]
    context: tuple[str, ...]
    batch_statistics: bool = False
    stateful: bool = False
    fired: str = "fired"  # what the rule's True is called: its metric is <teacher>/<fired>_<student>


GATES: dict[str, GateSpec] = {}


def _spec_from_signature(name: str, fn: Callable[..., bool], fired: str) -> GateSpec:
    signature = read_signature(fn, f"gate {name!r} ({getattr(fn, '__qualname__', fn)})", ROLE_PARAMETERS,
                               CONTEXT_NAMES, GATE_FIELD_NAMES, "a gate field",
                               {BATCH_NAME: (WHOLE_BATCH, "WHOLE_BATCH (cohort.losses.batch)"),
                                STATE_NAME: (None, "None")})
    return GateSpec(name, fn, signature.params, signature.context, BATCH_NAME in signature.markers,
                    STATE_NAME in signature.markers, fired)


def register_gate(name: str, fired: str = "fired") -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    """Register a gate rule under ``name``; the function is returned unchanged. ``fired``: what a
    step in which the rule fires is called (switokd: ``expert``, its expert mode), in metric names."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", fired):
        raise ValueError(f"gate {name!r}: fired={fired!r} must be a lower-case word (it names a metric)")

    def decorator(fn: Callable[..., bool]) -> Callable[..., bool]:
        if name in GATES:
            raise ValueError(f"a gate named {name!r} is already registered")
        GATES[name] = _spec_from_signature(name, fn, fired)
        return fn

    return decorator


def get_gate(name: str) -> GateSpec:
    try:
        return GATES[name]
    except KeyError:
        raise KeyError(f"unknown gate {name!r}; known gates: {sorted(GATES)}") from None
