"""A decorator registry of distillation losses, in the style of torchdistill.

A loss is registered by one line, ``@register_loss("name")``. Its signature says everything the
trainer needs: the first two positional parameters are ``receiver`` and ``sender`` (logits), the
names in ``CONTEXT_NAMES`` are supplied per batch by the trainer, a parameter ``batch`` (default
``WHOLE_BATCH``) marks a loss that takes statistics over the batch (``cohort.losses.batch``), and
every other parameter is a tunable edge parameter whose default is read from the signature (its
name must not be one of ``EDGE_FIELD_NAMES``, the edge's own keys).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cohort.config.signatures import read_signature

from .batch import WHOLE_BATCH

CONTEXT_NAMES = ("target", "groups")
BATCH_NAME = "batch"
# The keys and python names of an edge (cohort.topology.edges.Edge): a loss parameter named like one
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
    signature = read_signature(fn, f"loss {name!r} ({getattr(fn, '__qualname__', fn)})", ("receiver", "sender"),
                               CONTEXT_NAMES, EDGE_FIELD_NAMES, "an edge field",
                               {BATCH_NAME: (WHOLE_BATCH, "WHOLE_BATCH (cohort.losses.batch)")})
    return LossSpec(name=name, fn=fn, params=signature.params, context=signature.context,
                    batch_statistics=BATCH_NAME in signature.markers)


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
