"""A decorator registry of distillation losses, in the style of torchdistill.

A loss is registered by one line, ``@register_loss("name")``. Its signature says everything the
trainer needs: the first two positional parameters are ``receiver`` and ``sender`` (logits), the
names in ``CONTEXT_NAMES`` are supplied per batch by the trainer, a parameter ``batch`` (default
``WHOLE_BATCH``) marks a loss that takes statistics over the batch (``cohort.losses.batch``), and
every other parameter is a tunable edge parameter whose default is read from the signature (its
name must not be one of ``EDGE_FIELD_NAMES``, the edge's own keys).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .batch import WHOLE_BATCH

CONTEXT_NAMES = ("target", "groups")
BATCH_NAME = "batch"
# The keys and python names of an edge (cohort.edges.Edge): a loss parameter named like one
# would be read as the edge's own setting, never reach the loss. Checked against Edge in the tests.
EDGE_FIELD_NAMES = ("from", "to", "loss", "weight", "reduce", "warmup", "source")


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., Tensor]
    params: dict[str, object]
    context: tuple[str, ...]
    # Takes statistics over the batch through its ``batch`` parameter: with replicas, the trainer
    # passes one that reduces over the peer's replicas.
    batch_statistics: bool = False


LOSSES: dict[str, LossSpec] = {}


def _spec_from_signature(name: str, fn: Callable[..., Tensor]) -> LossSpec:
    parameters = list(inspect.signature(fn).parameters.values())
    where = f"loss {name!r} ({getattr(fn, '__qualname__', fn)})"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    leading = [p.name for p in parameters[:2]]
    if leading != ["receiver", "sender"]:
        raise ValueError(
            f"{where}: the first two parameters must be (receiver, sender), got {leading}"
        )
    for p in parameters[:2]:
        if p.kind not in positional or p.default is not inspect.Parameter.empty:
            raise ValueError(
                f"{where}: {p.name!r} must be a positional parameter without a default"
            )

    params: dict[str, object] = {}
    context: list[str] = []
    batch_statistics = False
    for p in parameters[2:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ValueError(f"{where}: *args/**kwargs are not allowed ({p.name!r})")
        has_default = p.default is not inspect.Parameter.empty
        if p.name in EDGE_FIELD_NAMES:
            raise ValueError(f"{where}: parameter {p.name!r} is named like an edge field "
                             f"({', '.join(EDGE_FIELD_NAMES)}): rename it")
        if p.name == BATCH_NAME:
            if p.default is not WHOLE_BATCH:
                raise ValueError(f"{where}: parameter {BATCH_NAME!r} must default to WHOLE_BATCH "
                                 "(cohort.losses.batch)")
            batch_statistics = True
        elif p.name in CONTEXT_NAMES:
            # The trainer always supplies context; a default would hide a missing value.
            if has_default:
                raise ValueError(f"{where}: context parameter {p.name!r} must not have a default")
            context.append(p.name)
        elif has_default:
            params[p.name] = p.default
        else:
            raise ValueError(
                f"{where}: parameter {p.name!r} has no default and is not a context name "
                f"{CONTEXT_NAMES}"
            )
    return LossSpec(name=name, fn=fn, params=params, context=tuple(context), batch_statistics=batch_statistics)


def register_loss(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a loss function under ``name``; the function is returned unchanged."""

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered")
        LOSSES[name] = _spec_from_signature(name, fn)
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None
