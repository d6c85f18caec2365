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

import inspect
import re
from dataclasses import dataclass
from typing import Callable

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
    parameters = list(inspect.signature(fn).parameters.values())
    where = f"gate {name!r} ({getattr(fn, '__qualname__', fn)})"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    leading = [p.name for p in parameters[:2]]
    if leading != list(ROLE_PARAMETERS):
        raise ValueError(f"{where}: the first two parameters must be {ROLE_PARAMETERS}, got {leading}")
    for p in parameters[:2]:
        if p.kind not in positional or p.default is not inspect.Parameter.empty:
            raise ValueError(f"{where}: {p.name!r} must be a positional parameter without a default")
    params: dict[str, object] = {}
    context: list[str] = []
    batch_statistics = stateful = False
    for p in parameters[2:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ValueError(f"{where}: *args/**kwargs are not allowed ({p.name!r})")
        has_default = p.default is not inspect.Parameter.empty
        if p.name in GATE_FIELD_NAMES:
            raise ValueError(f"{where}: parameter {p.name!r} is named like a gate field "
                             f"({', '.join(GATE_FIELD_NAMES)}): rename it")
        if p.name == BATCH_NAME:
            if p.default is not WHOLE_BATCH:
                raise ValueError(f"{where}: parameter {BATCH_NAME!r} must default to WHOLE_BATCH (cohort.losses.batch)")
            batch_statistics = True
        elif p.name == STATE_NAME:
            if p.default is not None:
                raise ValueError(f"{where}: parameter {STATE_NAME!r} must default to None")
            stateful = True
        elif p.name in CONTEXT_NAMES:
            if has_default:
                raise ValueError(f"{where}: context parameter {p.name!r} must not have a default")
            context.append(p.name)
        elif has_default:
            params[p.name] = p.default
        else:
            raise ValueError(f"{where}: parameter {p.name!r} has no default and is not a context name {CONTEXT_NAMES}")
    return GateSpec(name, fn, params, tuple(context), batch_statistics, stateful, fired)


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
