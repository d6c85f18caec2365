"""A registered function's signature read as its schema, for the loss and gate registries
(``cohort.losses.registry``, ``cohort.gates.registry``): what the trainer passes and what a
topology may set are told from the parameters alone.

- the first two parameters are positional, without defaults, and named as the registry says
  (a loss: ``receiver, sender``; a gate: ``teacher_logits, student_logits``);
- a *context* name (``target``, ...) is supplied by the trainer every step: no default;
- a *marker* (``batch``, ``state``) must have the default the registry names, and its presence
  says what the function needs (batch statistics, state between steps);
- every other parameter is a topology key, with its default read from the signature; none may
  be named like the topology's own keys of an edge or a gate (it would never reach the function).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cohort.config.errors import did_you_mean, quoted
from cohort.config.schema import problem

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
# Parameters that divide (a softmax temperature, MCL's similarity scale τ): 0 is refused as well.
POSITIVE_PARAMETERS = ("temperature", "tau")


@dataclass(frozen=True)
class Signature:
    params: dict[str, object]  # topology key -> default
    context: tuple[str, ...]  # the context names it takes, in order
    markers: frozenset[str]  # the markers it has


def read_signature(fn: Callable[..., Any], where: str, leading: tuple[str, str], context_names: tuple[str, ...],
                   reserved: tuple[str, ...], reserved_kind: str,
                   markers: Mapping[str, tuple[object, str]]) -> Signature:
    """``fn``'s schema; ``ValueError`` naming ``where`` and the parameter for anything else.
    ``markers``: {name: (the default it must have, how an error message names that default)}."""
    parameters = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in parameters[:2]]
    if names != list(leading):
        raise ValueError(f"{where}: the first two parameters must be ({', '.join(leading)}), got {names}")
    for p in parameters[:2]:
        if p.kind not in POSITIONAL or p.default is not inspect.Parameter.empty:
            raise ValueError(f"{where}: {p.name!r} must be a positional parameter without a default")
    params: dict[str, object] = {}
    context: list[str] = []
    seen: set[str] = set()
    for p in parameters[2:]:
        if p.kind in VARIADIC:
            raise ValueError(f"{where}: *args/**kwargs are not allowed ({p.name!r})")
        has_default = p.default is not inspect.Parameter.empty
        if p.name in reserved:
            raise ValueError(f"{where}: parameter {p.name!r} is named like {reserved_kind} "
                             f"({', '.join(reserved)}): rename it")
        if p.name in markers:
            default, described = markers[p.name]
            if p.default is not default:
                raise ValueError(f"{where}: parameter {p.name!r} must default to {described}")
            seen.add(p.name)
        elif p.name in context_names:
            # The trainer always supplies context; a default would hide a missing value.
            if has_default:
                raise ValueError(f"{where}: context parameter {p.name!r} must not have a default")
            context.append(p.name)
        elif has_default:
            params[p.name] = p.default
        else:
            raise ValueError(f"{where}: parameter {p.name!r} has no default and is not a context name {context_names}")
    return Signature(params, tuple(context), frozenset(seen))


# --------------------------------------------------------------------------- a topology entry's parameters


def keyword_parameters(what: str, params: dict[str, Any], given: dict[str, Any], fields) -> dict[str, Any]:
    """The keyword arguments of a registered function (a loss, a gate rule: ``what``) from the keys a
    topology entry gives beside its own ``fields``: each checked, every missing one its default."""
    for key in given:
        if key not in params:
            allowed = list(fields) + list(params)
            raise problem(f"not a parameter of {what}{did_you_mean(key, allowed)}"
                          f" (it takes: {', '.join(params) or 'nothing'})", key)
    return {key: loss_parameter(key, given.get(key, default), default) for key, default in params.items()}


def loss_parameter(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise problem(f"must be true or false, not {quoted(value)}", key)
        return value
    if isinstance(default, (int, float)):
        if not finite_number(value):
            raise problem(f"must be a number, not {quoted(value)}", key)
        if key in POSITIVE_PARAMETERS and value <= 0:
            raise problem(f"must be > 0, not {quoted(value)}", key)
        if value < 0:
            raise problem(f"must be >= 0, not {quoted(value)}", key)
        return float(value)
    return value


def finite_number(value: Any) -> bool:
    """A finite int or float (not a bool) that fits a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range
        return False


def resolve_extras(model: Any, what: str, params: dict[str, Any], fields) -> None:
    """A topology entry (an edge, a gate) whose extra keys are a registered function's parameters:
    replace them by every parameter, checked, its default where not given (``keyword_parameters``)."""
    extra = model.__pydantic_extra__
    resolved = keyword_parameters(what, params, dict(extra or {}), fields)
    extra.clear()
    extra.update(resolved)
