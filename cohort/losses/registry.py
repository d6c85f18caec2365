"""A decorator registry of distillation losses, in the style of torchdistill.

A loss is registered by one line, ``@register_loss("name")``. Its signature says everything the
trainer needs: the first two positional parameters are ``receiver`` and ``sender`` (logits), the
names in ``CONTEXT_NAMES`` are supplied per batch by the trainer, a parameter ``batch`` (default
``WHOLE_BATCH``) marks a loss that takes statistics over the batch (``cohort.losses.batch``), and
every other parameter is a tunable edge parameter whose default is read from the signature (its
name must not be one of ``EDGE_FIELD_NAMES``, the edge's own keys).

``register_loss(name, payload=...)`` says what a loss exchanges between peers (one of ``PAYLOADS``),
and so what its ``receiver`` and ``sender`` are:

- ``"logits"`` (the default): the receiver's live logits and the sender's detached logits, both
  ``[B, classes]``; the loss returns a per-sample ``[B]`` tensor that the trainer averages.
- ``"embedding"``: the receiver's live embedding ``[B, D]`` and the sender's, detached (MCL,
  ``cohort.losses.mcl``).
- ``"maps"``: per-stage maps, the receiver's live features and the sender's exchanged maps (online
  attention transfer, ``cohort.losses.attention``).

A loss with a non-logit payload returns a scalar (a 0-dim tensor), not a per-sample tensor: its
terms are not means of per-sample values (MCL's contrastive mean leaves out the rows without a
positive, a mean over a whole similarity matrix is not one over images), so it reduces itself.
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
# What a loss exchanges (its receiver and sender), in the module docstring's words.
LOGITS, EMBEDDING, MAPS = "logits", "embedding", "maps"
PAYLOADS = (LOGITS, EMBEDDING, MAPS)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., Tensor]
    params: dict[str, object]
    context: tuple[str, ...]
    # Takes statistics over the batch through its ``batch`` parameter: with replicas, the trainer
    # passes one that reduces over the peer's replicas.
    batch_statistics: bool = False
    # What it exchanges (one of PAYLOADS): logits give a per-sample [B] loss, the others a scalar.
    payload: str = "logits"


LOSSES: dict[str, LossSpec] = {}


def _spec_from_signature(name: str, fn: Callable[..., Tensor], payload: str = "logits") -> LossSpec:
    signature = read_signature(fn, f"loss {name!r} ({getattr(fn, '__qualname__', fn)})", ("receiver", "sender"),
                               CONTEXT_NAMES, EDGE_FIELD_NAMES, "an edge field",
                               {BATCH_NAME: (WHOLE_BATCH, "WHOLE_BATCH (cohort.losses.batch)")})
    return LossSpec(name=name, fn=fn, params=signature.params, context=signature.context,
                    batch_statistics=BATCH_NAME in signature.markers, payload=payload)


def register_loss(name: str, *, payload: str = "logits") -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a loss function under ``name``; the function is returned unchanged.

    ``payload``: what its ``receiver`` and ``sender`` are (one of ``PAYLOADS``, module docstring).
    """
    if payload not in PAYLOADS:
        raise ValueError(f"loss {name!r}: payload must be one of {', '.join(PAYLOADS)}, not {payload!r}")

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered")
        LOSSES[name] = _spec_from_signature(name, fn, payload)
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None
